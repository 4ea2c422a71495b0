"""The trainer under real faults of the machine: the sandbox's interpreter is taken away under a
running trainer (its executable gone, the warm interpreter killed, restarts failing: every tool
call then ends in a sandbox fault), as tests/test_sandbox_faults.py does to a lone sandbox.

Training goes on: the faulted trajectories never reach the loss (checked on the batch the actor
was given), their groups are scored from their survivors, the step's metrics count it all; once
the interpreter is back the run trains as before. A run whose faults stay above
`sandbox.fault_stop_share` stops with one message, a checkpoint and exit code 3, and `--resume`
continues it."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from contextlib import contextmanager

import pytest
import torch
from test_trainer import FAST, _warm_cfg

import cir.sandbox.client as client
import cir.training.trainer as trainer_module
from cir.algorithms import compute_advantages
from cir.cli import main
from cir.metrics import read_metrics
from cir.sandbox import Sandbox
from cir.training.trainer import Trainer

QUIET = ("run.eval_at_start=false", "data.eval=[]")


def _wait(predicate, what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


class Interpreter:
    """The sandbox's interpreter as a symlink the test can take away and give back."""

    def __init__(self, folder):
        self.exe = folder / "python"
        self.give_back()

    def give_back(self) -> None:
        if not self.exe.is_symlink():
            self.exe.symlink_to(os.path.realpath(sys.executable))

    def take_away(self, sb: Sandbox) -> None:
        """The executable gone and the warm interpreter killed: restarts fail until it is back."""
        _wait(lambda: sb.stats()["ready"], "the sandbox to start")
        self.exe.unlink()
        os.kill(sb.stats()["zygote_pid"], signal.SIGKILL)
        _wait(lambda: not sb.stats()["available"], "the sandbox to give up starting")


@pytest.fixture
def interpreter(tmp_path, monkeypatch):
    """Trainers built in this test start their sandbox on an interpreter the test controls, and
    retry failed starts after 0.05 s (doubling up to 0.4 s) rather than the default 0.1-30 s,
    so that it is back in a moment once given back."""
    interp = Interpreter(tmp_path)
    monkeypatch.setattr(client, "_interpreter_path", lambda: str(interp.exe))

    def from_config(cfg):
        return Sandbox(
            workers=cfg.workers,
            timeout_s=cfg.timeout_s,
            memory_mb=cfg.memory_mb,
            max_output_bytes=cfg.max_output_bytes,
            preload=tuple(cfg.preload),
            restart_backoff_s=(0.05, 0.4),
        )

    monkeypatch.setattr(trainer_module.Sandbox, "from_config", staticmethod(from_config))
    return interp


@contextmanager
def interpreter_gone(interp: Interpreter, sb: Sandbox):
    interp.take_away(sb)
    try:
        yield
    finally:
        interp.give_back()
        _wait(lambda: sb.stats()["ready"], "the sandbox to start again")


def _record(trainer: Trainer):
    """What each step collected and the batch each update got."""
    seen: dict[str, list] = {"collected": [], "batches": []}
    collect, update = trainer.collect, trainer.actor.update

    def collect_and_keep(stage):
        seen["collected"].append(collect(stage))
        return seen["collected"][-1]

    def update_and_keep(batch):
        seen["batches"].append(batch)
        return update(batch)

    trainer.collect, trainer.actor.update = collect_and_keep, update_and_keep
    return seen


def _batch_sequences(batch) -> list[tuple[int, ...]]:
    """The response tokens of every trajectory in the batch, as the loss gets them."""
    out = []
    for mb in batch.micro_batches:
        bounds = mb.cu_seqlens.tolist()
        out += [tuple(mb.targets[a:b].tolist()) for a, b in zip(bounds, bounds[1:])]
    return out


@pytest.mark.parametrize("dynamic", [False, True], ids=["all_groups", "dynamic_sampling"])
def test_training_goes_on_without_the_faulted_trajectories(tmp_path, warm_model_dir, interpreter, dynamic):
    more = ["algo.prompts_per_step=8", f"algo.dynamic_sampling={str(dynamic).lower()}"]
    cfg = _warm_cfg(tmp_path, warm_model_dir, "run.steps=3", *QUIET, *more)
    with Trainer(cfg) as t:
        seen = _record(t)
        first_step = t.step()
        with interpreter_gone(interpreter, t.sandbox):
            faulted_step = t.step()
        weights = {k: v.detach().clone() for k, v in t.actor.model.state_dict().items()}
        last_step = t.step()
        assert any(not torch.equal(v, t.actor.model.state_dict()[k]) for k, v in weights.items()), "no update after"

    collected, batch = seen["collected"][1], seen["batches"][1]
    faulted = [t for t, r in zip(collected.trajectories, collected.rewards) if r.fault is not None]
    assert faulted and all(t.finish_reason == "sandbox_fault" and t.sandbox_fault for t in faulted)
    assert all(r.fault == "sandbox" for r in collected.rewards if r.fault is not None)
    # Each group's survivors, counted here from the rollout: a group that lost some is scored
    # from the rest if two or more are left, else dropped.
    members: dict[int, list] = {}
    for t in collected.trajectories:
        members.setdefault(t.group, []).append(t)
    survivors = {g: [t for t in ts if not t.sandbox_fault] for g, ts in members.items()}
    hit = {g for g, ts in members.items() if len(survivors[g]) < len(ts)}
    dropped = {g for g in hit if len(survivors[g]) < 2}
    assert hit - dropped and dropped, (len(hit), len(dropped))  # both cases happen in this step
    # What reached the loss: survivors only, whole survivor sets of groups not dropped, with the
    # advantages of those trajectories alone (the faulted ones are in no group's baseline).
    trained = collected.trained
    assert trained and not any(t.sandbox_fault for t in trained)
    assert sorted(_batch_sequences(batch)) == sorted(tuple(t.response_ids) for t in trained)
    trained_groups = {t.group for t in trained}
    assert not trained_groups & dropped and trained_groups & (hit - dropped)
    for g in trained_groups:
        assert [id(t) for t in trained if t.group == g] == [id(t) for t in survivors[g]], g
    if not dynamic:  # every group not dropped is trained on
        assert trained_groups == set(members) - dropped
    want = compute_advantages(
        cfg.algo.advantage,
        torch.tensor([r.reward for r in collected.trained_rewards]),
        torch.tensor([t.group for t in trained]),
        num_tokens=torch.tensor([t.num_model_tokens for t in trained]),
    )
    assert torch.equal(batch.advantages, want)
    # The step's numbers.
    left_out = len(faulted) + sum(len(survivors[g]) for g in dropped)
    assert faulted_step["fault/sandbox_trajectories"] == len(faulted) == faulted_step["fault/sandbox_calls"]
    assert faulted_step["fault/excluded_trajectories"] == left_out
    assert faulted_step["fault/excluded_groups"] == len(dropped)
    assert faulted_step["fault/partial_groups"] == len(hit - dropped)
    assert faulted_step["data/trajectories_trained"] == len(trained)
    assert faulted_step["sandbox/unavailable"] == len(faulted)  # refused while no interpreter could start
    assert faulted_step["tool/sandbox_fault_rate"] > 0
    # Back to normal: no fault, every trajectory trained on.
    assert last_step["fault/sandbox_calls"] == last_step["fault/excluded_trajectories"] == 0
    if not dynamic:
        assert last_step["data/trajectories_trained"] == len(seen["collected"][2].trajectories)
    steps = (first_step, faulted_step, last_step)
    assert [m["fault/sandbox_calls"] for m in steps] == [0, len(faulted), 0]
    # Counted since the previous step: the failed starts once the interpreter was gone, the
    # start that succeeded once it was back.
    assert faulted_step["sandbox/start_failures"] >= 3 and faulted_step["sandbox/restarts"] >= 3
    assert last_step["sandbox/restarts"] >= 1 and first_step["sandbox/restarts"] == 0
    for key in ("sandbox/retries", "sandbox/faults", "sandbox/faults_interpreter_lost", "grader/faults"):
        assert all(key in m for m in steps), key


def test_a_run_whose_sandbox_keeps_failing_stops_with_a_checkpoint_and_resumes(
    tmp_path, warm_model_dir, interpreter, capsys
):
    out = tmp_path / "run"
    args = [*FAST, f"model.path={warm_model_dir}", "data.prompt=demo", *QUIET, f"run.out_dir={out}", "run.steps=3"]
    args += ["sandbox.fault_stop_steps=2"]
    from_config = trainer_module.Sandbox.from_config

    def broken(cfg):  # the interpreter is lost as soon as the trainer's sandbox is up
        sb = from_config(cfg)
        interpreter.take_away(sb)
        return sb

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(trainer_module.Sandbox, "from_config", staticmethod(broken))
        code = main(["train", *args])
    err = capsys.readouterr().err
    said = [line for line in err.splitlines() if "stopped at step" in line]
    assert code == 3 and len(said) == 1, err[-3000:]
    assert said[0].startswith(
        "[cir] stopped at step 2: sandbox faults were over sandbox.fault_stop_share=0.05 of tool calls for 2 steps "
        "in a row (sandbox.fault_stop_steps=2); the last: 100.0% of tool calls ("
    ), said[0]
    assert said[0].endswith(f"saved {out / 'checkpoints' / 'step_000002'} (continue with --resume)"), said[0]
    assert "sandbox faults: 100.0% of tool calls" in err  # the warning after step 1
    assert (out / "checkpoints" / "step_000002" / "model.safetensors").is_file()
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2] and all(r["fault/sandbox_calls"] == r["tool/calls"] > 0 for r in rows)

    interpreter.give_back()
    assert main(["train", "--resume", *args]) == 0
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[-1]["fault/sandbox_calls"] == 0 and rows[-1]["tool/calls"] > 0
    assert (out / "checkpoints" / "step_000003" / "model.safetensors").is_file()


def test_a_grader_that_cannot_decide_is_left_out_of_the_loss(tmp_path, warm_model_dir):
    """A reference the grader cannot settle in time (9^(9^9), a 370-million-digit integer sympy
    computes in C): every boxed answer to that problem hangs its worker, which is killed and the
    answer retried twice, then given up as a grader fault. Not -1: out of the loss, counted."""
    rows = [{"problem": p, "answer": a} for p, a in [("3+4", "7"), ("12*5-7", "53"), ("8+9", "17")]]
    rows.insert(1, {"problem": "2+2", "answer": "9^{9^{9}}"})
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    more = (f"data.train={data}", "reward.grader_timeout_s=0.25")
    cfg = _warm_cfg(tmp_path / "run", warm_model_dir, "run.steps=1", *QUIET, *more)
    with Trainer(cfg) as t:
        seen = _record(t)
        m = t.step()
    collected, batch = seen["collected"][0], seen["batches"][0]
    faulted = [(t, r) for t, r in zip(collected.trajectories, collected.rewards) if r.fault is not None]
    assert faulted and all(r.fault == "grader_timeout" and r.reward == 0.0 for _, r in faulted)
    assert {t.problem_id for t, _ in faulted} == {"train-1"}
    assert not {id(t) for t, _ in faulted} & {id(t) for t in collected.trained}
    assert sorted(_batch_sequences(batch)) == sorted(tuple(t.response_ids) for t in collected.trained)
    assert m["fault/grader_trajectories"] == len(faulted) and m["fault/sandbox_trajectories"] == 0
    assert (m["grader/timeouts"], m["grader/retries"]) == (len(faulted), 2 * len(faulted))
    assert m["fault/excluded_trajectories"] >= len(faulted)
    graded = [r for r in collected.rewards if r.fault is None]
    assert m["reward/mean"] == pytest.approx(sum(r.reward for r in graded) / len(graded))
