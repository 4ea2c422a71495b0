"""Per-step metrics and their file: faulted results left out of the reward and counted, the
grader's counts logged, and a metrics line cut off by a hard stop dropped on resume."""

from __future__ import annotations

import json

import pytest

from cir.algorithms.schedule import Stage
from cir.metrics import read_metrics, step_metrics, truncate_metrics
from cir.rewards import GraderCounters, RewardResult, faulted_result
from cir.trajectory import Trajectory


def test_a_metrics_line_cut_off_mid_write_is_dropped_with_a_message(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "reward/mean": s / 10} for s in (1, 2, 3)]
    text = "".join(json.dumps(r) + "\n" for r in rows)
    for torn in ('{"step": 4, "reward/me', "\x00" * 37, '{"step": 4, "reward/mean": 0.' + "\n\n"):
        path.write_text(text + torn)
        assert read_metrics(path) == rows
        assert "dropped the last line, cut off mid-write" in capsys.readouterr().err
    # On resume the file is rewritten without it (and without the steps after the checkpoint).
    assert truncate_metrics(path, 2) == rows[:2]
    assert path.read_text() == "".join(json.dumps(r) + "\n" for r in rows[:2])
    # A last line that is whole but lacks its newline is kept.
    path.write_text(text.rstrip("\n"))
    assert read_metrics(path) == rows
    # Damage before the last line is no crash artefact: an error naming the line.
    path.write_text(text + "not json\n" + json.dumps({"step": 4}) + "\n")
    with pytest.raises(ValueError, match=r"metrics.jsonl:4: not a JSON line"):
        read_metrics(path)


def test_step_metrics_leave_faults_out_of_the_reward_and_count_them():
    trajectories = [
        Trajectory(prompt_ids=[1], response_ids=[2, 3], loss_mask=[1, 1], sampler_logprobs=[0, 0]) for _ in range(5)
    ]
    rewards = [
        RewardResult(1.0, True),
        RewardResult(-1.0, False),
        RewardResult(1.0, True),
        faulted_result("sandbox"),
        faulted_result("grader_timeout"),
    ]
    times = {"rollout": 1.0, "reward": 0.5, "update": 1.0, "step": 2.5}
    m = step_metrics(
        trajectories,
        rewards,
        trained=3,
        stage=Stage(start_step=0, tool_budget=1, max_response_tokens=64),
        epoch=0,
        times=times,
        grader=GraderCounters(retries=4, timeouts=1, crashes=0, restarts=5),
    )
    # Scored as wrong, the faults would make the mean 1/5 and the accuracy 2/5.
    assert m["reward/mean"] == pytest.approx(1 / 3) and m["reward/accuracy"] == pytest.approx(2 / 3)
    assert (m["fault/sandbox_trajectories"], m["fault/grader_trajectories"]) == (1, 1)
    assert (m["grader/retries"], m["grader/faults"], m["grader/restarts"]) == (4, 1, 5)
    assert m["data/trajectories"] == 5 and m["data/trajectories_trained"] == 3
