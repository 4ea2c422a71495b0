"""The machine's faults kept out of training, piece by piece (`cir.training.faults`): which
trajectories survive, what the advantage estimators and dynamic sampling make of groups of
varying size, where survivors go in the batch, the per-step counts (summed over ranks under
torchrun) and the stop threshold. The trainer with real faults: tests/test_trainer_faults.py."""

import subprocess
import sys
import textwrap

import pytest
import torch

from cir.algorithms import advantage_names, compute_advantages, informative_groups
from cir.algorithms.schedule import Stage
from cir.config_loader import ConfigError
from cir.metrics import step_metrics
from cir.rewards import RewardResult, faulted_result
from cir.rollout import rollout_stats
from cir.training.config import load_train_config
from cir.training.faults import Exclusion, FaultWatch, count_groups, counter_delta, fault_survivors, first_groups
from cir.trajectory import SANDBOX_FAULT, ToolCall, Trajectory


def test_faulted_trajectories_leave_the_batch_and_a_group_with_fewer_than_two_survivors_goes():
    groups = [7, 7, 7, 7, 8, 8, 8, 8, 9, 9, 9, 9, 4, 4]
    faulted = [0, 1, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 1, 1]
    keep, lost = fault_survivors([bool(f) for f in faulted], groups)
    # Group 7 is scored from its three survivors; 8 keeps one (dropped whole); 9 lost nothing;
    # 4 lost everything.
    assert keep == [0, 2, 3, 8, 9, 10, 11]
    assert lost == Exclusion(faulted=6, trajectories=7, groups=2, partial_groups=1)
    assert lost + lost == Exclusion(faulted=12, trajectories=14, groups=4, partial_groups=2)
    assert lost.as_totals() == {
        "fault/excluded_trajectories": 7.0,
        "fault/excluded_groups": 2.0,
        "fault/partial_groups": 1.0,
    }


def test_without_faults_everything_is_kept_even_groups_of_one():
    groups = [0, 1, 1, 2, 2, 2]
    keep, lost = fault_survivors([False] * 6, groups)
    assert keep == list(range(6)) and lost == Exclusion()
    assert fault_survivors([], []) == ([], Exclusion())
    with pytest.raises(ValueError, match="3 fault flags for 2 group ids"):
        fault_survivors([False] * 3, [0, 0])


def _survivor_batch():
    """Three groups of four; group 1 lost one trajectory to a fault (its reward is the faulted
    result's 0.0, which must reach no estimator), group 2 two."""
    rewards = torch.tensor([1.0, -1.0, -1.0, 1.0, 1.0, 0.0, -1.0, -1.0, 1.0, 0.0, 0.0, -1.0])
    groups = torch.arange(12) // 4
    faulted = [False] * 5 + [True] + [False] * 3 + [True, True] + [False]
    tokens = torch.tensor([5, 9, 3, 7, 4, 100, 6, 8, 2, 100, 100, 3])
    return rewards, groups, faulted, tokens


@pytest.mark.parametrize("name", advantage_names())
def test_every_estimator_sees_survivors_only(name):
    """Whatever a faulted trajectory held (its reward, its length), the survivors' advantages are
    those of a batch in which it never existed: group baselines over the survivors, REINFORCE++'s
    whitening over the survivors."""
    rewards, groups, faulted, tokens = _survivor_batch()
    keep, _ = fault_survivors(faulted, groups.tolist())
    got = compute_advantages(name, rewards[keep], groups[keep], num_tokens=tokens[keep])
    assert torch.isfinite(got).all()
    for fake in (5.0, -7.0):  # the faulted entries changed: nothing the survivors get may move
        r = rewards.clone()
        r[torch.tensor(faulted)] = fake
        assert torch.equal(compute_advantages(name, r[keep], groups[keep], num_tokens=tokens[keep]), got)


def test_group_baselines_over_survivors_by_hand():
    rewards, groups, faulted, tokens = _survivor_batch()
    keep, _ = fault_survivors(faulted, groups.tolist())
    r, g = rewards[keep], groups[keep]  # group 1: [1, -1, -1] (3 survivors), group 2: [1, -1]
    grpo_no_std = compute_advantages("grpo_no_std", r, g)
    want = torch.tensor([1, -1, -1, 1, 1 + 1 / 3, -1 + 1 / 3, -1 + 1 / 3, 1, -1], dtype=torch.float32)
    torch.testing.assert_close(grpo_no_std, want, rtol=0, atol=1e-6)
    # RLOO: each minus the mean of the others of its group, over its own group's size.
    rloo = compute_advantages("rloo", r, g)
    torch.testing.assert_close(rloo[4:7], torch.tensor([2.0, -1.0, -1.0]), rtol=0, atol=1e-6)
    torch.testing.assert_close(rloo[7:], torch.tensor([2.0, -2.0]), rtol=0, atol=1e-6)


def test_dynamic_sampling_takes_groups_of_any_size():
    rewards = torch.tensor([1.0, -1.0, 1.0, 1.0, 1.0, -1.0, 1.0, -1.0, 1.0])
    groups = torch.tensor([0, 0, 0, 1, 1, 2, 2, 3, 3])
    assert informative_groups(rewards, groups).tolist() == [True] * 3 + [False] * 2 + [True] * 4
    assert count_groups(groups.tolist()) == 4 and count_groups([]) == 0


def test_survivors_keep_their_groups_slots_in_the_global_list():
    # Without faults: group q of the step owns positions q*g .. q*g + g - 1, as before.
    full = [3, 3, 3, 3, 5, 5, 5, 5, 6, 6, 6, 6]
    assert first_groups(full, 2, 4, 4) == (8, list(range(16, 24)))
    assert first_groups(full, 5, 0, 4) == (12, list(range(12)))
    # Group 5 scored from two survivors: the third group still starts at its own slot.
    partial = [3, 3, 3, 3, 5, 5, 6, 6, 6, 6]
    assert first_groups(partial, 3, 1, 4) == (10, [4, 5, 6, 7, 8, 9, 12, 13, 14, 15])
    assert first_groups(partial, 0, 0, 4) == (0, [])


def test_counter_delta_is_one_steps_counts():
    before = {"retries": 2, "faults": 1, "restarts": 0}
    after = {"retries": 5, "faults": 1, "restarts": 2}
    assert counter_delta(before, after) == {"retries": 3.0, "faults": 0.0, "restarts": 2.0}


def test_the_fault_watch_warns_then_stops_after_steps_in_a_row():
    watch = FaultWatch(warn_share=0.01, stop_share=0.05, stop_steps=3)
    assert watch.check(1, 1, 100).action == "ok"  # 1%: not above the warning line
    warn = watch.check(2, 2, 100)
    assert warn.action == "warn" and "2.0% of tool calls (2 of 100) at step 2" in warn.message
    assert "sandbox.fault_warn_share=0.01" in warn.message
    assert [watch.check(s, 6, 100).action for s in (3, 4)] == ["warn", "warn"]
    assert watch.check(5, 5, 100).action == "warn"  # 5% is not over 5%: the run of high steps ends
    assert [watch.check(s, 30, 100).action for s in (6, 7)] == ["warn", "warn"]
    stop = watch.check(8, 12, 40)
    assert stop.action == "stop"
    assert "over sandbox.fault_stop_share=0.05 of tool calls for 3 steps in a row" in stop.message
    assert "sandbox.fault_stop_steps=3" in stop.message and "30.0% of tool calls (12 of 40) at step 8" in stop.message
    assert watch.check(9, 0, 0).action == "ok"  # no tool calls: nothing failed


def test_fault_thresholds_are_sandbox_settings_checked_at_load():
    cfg = load_train_config(None, ["sandbox.fault_stop_share=0.2", "sandbox.fault_stop_steps=1"])
    assert (cfg.sandbox.fault_warn_share, cfg.sandbox.fault_stop_share, cfg.sandbox.fault_stop_steps) == (0.01, 0.2, 1)
    with pytest.raises(ConfigError, match="fault_stop_share must be in"):
        load_train_config(None, ["sandbox.fault_stop_share=1.5"])
    with pytest.raises(ConfigError, match="fault_stop_steps must be >= 1"):
        load_train_config(None, ["sandbox.fault_stop_steps=0"])


def _traj(*statuses: str) -> Trajectory:
    t = Trajectory(prompt_ids=[1], response_ids=[2, 3], loss_mask=[1, 1], sampler_logprobs=[0.0, 0.0])
    t.tool_calls = [ToolCall("print(1)", s, "", (0, 1), (2, 2)) for s in statuses]
    return t


def test_a_sandbox_fault_is_not_the_models_error():
    t = _traj("ok", "error", SANDBOX_FAULT)
    assert (t.num_tool_calls, t.num_exec_errors, t.num_sandbox_faults) == (3, 1, 1)
    assert t.stats()["exec_errors"] == 1 and t.stats()["sandbox_faults"] == 1
    stats = rollout_stats([t, _traj("ok", "timeout")])
    # The model's error and timeout rates are over the 4 calls its code decided, not the 5 made.
    assert stats["exec_error_rate"] == pytest.approx(2 / 4)
    assert stats["timeout_rate"] == pytest.approx(1 / 4)
    assert stats["sandbox_fault_rate"] == pytest.approx(1 / 5)


def _step_metrics(dist=None, scale: int = 1):
    trajectories = [_traj("ok"), _traj("error"), _traj(SANDBOX_FAULT), _traj()]
    rewards = [RewardResult(1.0, True), RewardResult(-1.0, False), faulted_result("sandbox"), RewardResult(1.0, True)]
    return step_metrics(
        trajectories,
        rewards,
        trained=0,
        stage=Stage(start_step=0, tool_budget=1, max_response_tokens=64),
        epoch=0,
        times={"rollout": 1.0, "reward": 0.5, "update": 1.0, "step": 2.5},
        dist=dist,
        sandbox={"retries": 2 * scale, "restarts": 1, "faults": 1, "faults_interpreter_lost": 1},
        excluded=Exclusion(faulted=1, trajectories=3, groups=1, partial_groups=0),
    )


def test_step_metrics_count_the_machines_faults_apart():
    m = _step_metrics()
    assert (m["tool/calls"], m["fault/sandbox_calls"], m["tool/error_rate"]) == (3, 1, 0.5)
    assert m["tool/sandbox_fault_rate"] == pytest.approx(1 / 3)
    assert (m["sandbox/retries"], m["sandbox/restarts"], m["sandbox/faults_interpreter_lost"]) == (2, 1, 1)
    assert (m["fault/excluded_trajectories"], m["fault/excluded_groups"], m["fault/partial_groups"]) == (3, 1, 0)
    assert m["reward/mean"] == pytest.approx(1 / 3)


SUM_SCRIPT = """
import json
import sys

import torch

sys.path.insert(0, {tests!r})
from test_training_faults import _step_metrics

from cir.distributed import init_distributed
from cir.training.faults import FaultWatch

dist = init_distributed(device="cpu")
m = _step_metrics(dist, scale=dist.rank + 1)  # rank r retried 2 (r + 1) times
verdict = FaultWatch(warn_share=0.01, stop_share=0.05, stop_steps=1).check(1, m["fault/sandbox_calls"], m["tool/calls"])
keys = ["tool/calls", "fault/sandbox_calls", "sandbox/retries", "sandbox/restarts", "fault/excluded_trajectories"]
with open(f"{out}/rank{{dist.rank}}.json", "w") as f:
    json.dump({{**{{k: m[k] for k in keys}}, "verdict": verdict.action}}, f)
torch.distributed.barrier()
torch.distributed.destroy_process_group()
"""


def test_fault_counts_are_summed_over_ranks_and_every_rank_gets_the_same_verdict(tmp_path):
    import json
    from pathlib import Path

    script = tmp_path / "sum.py"
    script.write_text(textwrap.dedent(SUM_SCRIPT.format(tests=str(Path(__file__).parent), out=str(tmp_path))))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    want = {
        "tool/calls": 6.0,
        "fault/sandbox_calls": 2.0,
        "sandbox/retries": 6.0,
        "sandbox/restarts": 2.0,
        "fault/excluded_trajectories": 6.0,
        "verdict": "stop",
    }
    for rank in (0, 1):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == want, rank
