"""`torchrun --nproc_per_node=2 -m cir train` (FSDP2 over gloo, CPU) against one process on the same
global batch: the same rewards, losses and final weights within float tolerance, a checkpoint
written by two ranks that one rank resumes, the held-out evaluation sharded over ranks, and the
demo trained under torchrun. The model is the suite's warm-started demo (`warm_model_dir`)."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import assert_metrics_match
from safetensors.torch import load_file

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")

# A small global batch: 4 prompts x 4 samples, 2 prompts per rank with two ranks. One request
# decoded at a time (engine_max_batch=1), so sampling numerics do not depend on the batch.
BASE = [
    "data.prompt=demo",
    "data.eval=[]",
    "demo.train_problems=200",
    "algo.prompts_per_step=4",
    "algo.group_size=4",
    "run.eval_at_start=false",
    "run.tensorboard=false",
    "run.plot=false",
    "run.progress=false",
    "run.threads=1",
    "run.engine_max_batch=1",
    "sandbox.workers=1",
    "rollout.max_response_tokens=64",
    "schedule=[]",
]


def _train(out, warm_model_dir, *extra, ranks=1, resume=False):
    launcher = (
        [sys.executable, "-m", "cir"]
        if ranks == 1
        else [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={ranks}",
            "-m",
            "cir",
        ]
    )
    args = ["train", *BASE, f"model.path={warm_model_dir}", f"run.out_dir={out}", *extra] + (
        ["--resume"] if resume else []
    )
    proc = subprocess.run([*launcher, *args], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _weights(out, step):
    return load_file(str(out / "checkpoints" / f"step_{step:06d}" / "model.safetensors"))


def _assert_close(a, b, atol):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=k)


# Room for a hard problem's call, its output and the boxed answer (66 tokens), so that the warm
# model's held-out rows are graded both ways and the comparison is not a weak one.
HELD_OUT = [
    "data.eval=[demo]",
    "demo.eval_problems=11",
    "run.eval_at_start=true",
    "run.eval_temperature=1.0",
    "rollout.max_response_tokens=80",
]


def _eval_rows(out, step):
    path = out / "eval" / f"step_{step:06d}_demo.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def _assert_same_held_out_evaluation(out_one, out_two, row_one, row_two):
    """Each rank evaluates its share of the held-out problems and rank 0 gathers the rows. A
    sample's seed follows its problem's position in the whole set, so two ranks' evaluation is
    one process's, row for row, and the metrics (computed from all rows) are equal exactly."""
    before_one = {k: v for k, v in row_one.items() if k.startswith("eval/")}
    before_two = {k: v for k, v in row_two.items() if k.startswith("eval/")}
    assert row_one["step"] == row_two["step"] == 0
    assert before_one["eval/count"] == 11 and "eval/hard/accuracy" in before_one
    assert 0 < before_one["eval/accuracy"] < 1, "all rows graded alike: the comparison would be weak"
    assert before_two == before_one
    rows_one, rows_two = _eval_rows(out_one, 0), _eval_rows(out_two, 0)
    assert [r["index"] for r in rows_two] == list(range(11))
    assert len({r["id"] for r in rows_two}) == 11
    assert [r["id"] for r in rows_two] == [r["id"] for r in rows_one]
    # Not only the grades: the same sampled text, so the same draws.
    same = ("seed", "response", "correct", "reward", "tool_calls", "extracted_answer")
    assert [{k: r[k] for k in same} for r in rows_two] == [{k: r[k] for k in same} for r in rows_one]


def test_two_ranks_equal_one_process(tmp_path, warm_model_dir):
    """Two ranks against one process on the same global batch: the held-out evaluation before
    training (sharded over ranks), then two steps with dynamic sampling and two mini-batches."""
    # Dynamic sampling on: uninformative groups are dropped and refilled, and the ranks together
    # must keep the very groups one process keeps (`groups_to_keep`), each in the same one of
    # two optimizer steps (mini-batches follow a trajectory's global position).
    opts = ("run.steps=2", "algo.dynamic_sampling=true", "optim.mini_batches=2", *HELD_OUT)
    rows_one = _train(tmp_path / "one", warm_model_dir, *opts)
    rows_two = _train(tmp_path / "two", warm_model_dir, *opts, ranks=2)
    _assert_same_held_out_evaluation(tmp_path / "one", tmp_path / "two", rows_one[0], rows_two[0])
    one, two = ([r for r in rows if "reward/mean" in r] for rows in (rows_one, rows_two))
    assert [r["step"] for r in one] == [r["step"] for r in two] == [1, 2]
    assert one[0]["actor/grad_norm"] > 0, "no learning signal: the comparison would be empty"
    assert any(r["data/trajectories"] > r["data/trajectories_trained"] for r in one), "no group was dropped"
    for a, b in zip(one, two):
        # Rollouts are the same samples (seeds follow a problem's global position), graded alike,
        # and rates are global (counts summed over ranks before dividing).
        rollout = (
            "reward/mean",
            "tool/calls_per_traj",
            "tool/error_rate",
            "response/feedback_token_share",
            "response/model_tokens_mean",
            "data/trajectories",
            "data/trajectories_trained",
        )
        assert_metrics_match(b, a, rollout, where=a["step"])
        actor = ("actor/loss", "actor/grad_norm", "actor/advantage_abs_mean")
        assert_metrics_match(b, a, actor, rel=1e-4, abs=1e-6, where=a["step"])
    # Before any update the weights are identical, so every sampled token is: the entropy of the
    # whole batch agrees to float rounding. After an update the two runs' weights differ in the
    # last bits (sums over ranks come in another order), which can flip a sampled token now and
    # then; in a group with no reward variance that changes the entropy but not the gradient.
    assert one[0]["actor/entropy"] == pytest.approx(two[0]["actor/entropy"], rel=1e-5)
    # Two steps of AdamW moved the weights by up to 2e-3. Sharded and unsharded sums of the same
    # gradients differ in the last bits, and Adam divides by sqrt(v): on embedding rows of bytes
    # seen once or twice (gradients near zero) those bits become up to 5e-5 (2% of a step there).
    _assert_close(_weights(tmp_path / "one", 2), _weights(tmp_path / "two", 2), atol=1e-4)


def test_sharded_checkpoint_resumes_on_another_number_of_ranks(tmp_path, warm_model_dir):
    """The optimizer's sharded checkpoint (DCP) written by 2 ranks resumes in 1, and one written by
    1 process resumes on 2; both continue as the uninterrupted run. The 2-rank runs also shard
    the KL reference model and checkpoint activations, neither of which may change the result."""
    from transformers import AutoModelForCausalLM

    kl = ("algo.kl_coef=0.05",)
    sharded = (*kl, "model.gradient_checkpointing=true")
    straight = _train(tmp_path / "straight", warm_model_dir, "run.steps=2", "run.save_every=1", *kl)
    assert straight[-1]["actor/kl_loss"] > 0, "the KL term is inactive: the reference model would go untested"
    # 2 ranks -> 1 process
    _train(tmp_path / "down", warm_model_dir, "run.steps=1", *sharded, ranks=2)
    down = _train(tmp_path / "down", warm_model_dir, "run.steps=2", *kl, resume=True)
    # 1 process -> 2 ranks, from the uninterrupted run's own step-1 checkpoint
    step1 = Path("checkpoints") / "step_000001"
    shutil.copytree(tmp_path / "straight" / step1, tmp_path / "up" / step1)
    up = _train(tmp_path / "up", warm_model_dir, "run.steps=2", *sharded, ranks=2, resume=True)
    for resumed in (down, up):
        assert resumed[-1]["step"] == 2
        assert_metrics_match(resumed[-1], straight[-1], ["reward/mean"])
        actor = ("actor/grad_norm", "actor/loss", "actor/kl_loss")
        assert_metrics_match(resumed[-1], straight[-1], actor, rel=1e-4, abs=1e-7)
    for run in ("down", "up"):
        _assert_close(_weights(tmp_path / "straight", 2), _weights(tmp_path / run, 2), atol=1e-5)
    # The folders are plain transformers models, and they predict alike.
    ids = torch.tensor([[5, 17, 29, 3, 40, 41, 42]])
    logits = {}
    for run in ("straight", "down"):
        model = AutoModelForCausalLM.from_pretrained(tmp_path / run / "checkpoints" / "step_000002").eval()
        with torch.no_grad():
            logits[run] = model(ids).logits
    assert torch.isfinite(logits["down"]).all()
    torch.testing.assert_close(logits["down"], logits["straight"], rtol=0, atol=1e-4)


def test_ctrl_c_in_a_terminal_stops_after_the_step_and_saves(tmp_path, warm_model_dir):
    """One process in its own process group, as a terminal runs it: Ctrl-C signals the whole
    group (the sandbox's and the grader's workers too). The run finishes its step with those
    workers intact (a worker killed by the signal would print its traceback), saves, and exits
    with 130."""
    out = tmp_path / "run"
    args = [*BASE, f"model.path={warm_model_dir}", f"run.out_dir={out}", "run.steps=1000"]
    log = tmp_path / "stderr.txt"
    with open(log, "w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cir", "train", *args], stdout=subprocess.DEVNULL, stderr=err, start_new_session=True
        )
        try:
            deadline = time.monotonic() + 300
            while not (out / "metrics.jsonl").is_file() or not (out / "metrics.jsonl").read_text().strip():
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.5)
            os.killpg(proc.pid, signal.SIGINT)
            code = proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    stderr = log.read_text()
    assert code == 130, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    stopped = int(re.search(r"stopped at step (\d+); saved", stderr).group(1))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == stopped  # the step in flight was finished and logged
    assert (out / "checkpoints" / f"step_{stopped:06d}" / "optimizer" / ".metadata").is_file()


def test_ctrl_c_under_torchrun_saves_a_checkpoint_that_resumes(tmp_path, warm_model_dir):
    """Ctrl-C reaches torchrun, which forwards SIGINT to every rank; the ranks finish the step
    they are in, save together and exit. `--resume` continues from the next step."""
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "--shutdown-timeout=120",
        "-m",
        "cir",
        "train",
    ]
    args = [*BASE, f"model.path={warm_model_dir}", f"run.out_dir={out}", "run.steps=1000"]
    log = tmp_path / "stderr.txt"
    with open(log, "w") as err:
        proc = subprocess.Popen([*cmd, *args], stdout=subprocess.DEVNULL, stderr=err, text=True)
        try:
            deadline = time.monotonic() + 300
            while not (out / "metrics.jsonl").is_file() or not (out / "metrics.jsonl").read_text().strip():
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.5)
            proc.send_signal(signal.SIGINT)
            code = proc.wait(timeout=180)
        finally:
            if proc.poll() is None:
                proc.kill()
    stderr = log.read_text()
    assert code != 0, "an interrupted run must not report success"
    match = re.search(r"stopped at step (\d+); saved", stderr)
    assert match, stderr[-3000:]
    stopped = int(match.group(1))
    assert 1 <= stopped < 1000
    assert (out / "checkpoints" / f"step_{stopped:06d}" / "optimizer" / ".metadata").is_file()
    rows = _train(out, warm_model_dir, f"run.steps={stopped + 1}", ranks=2, resume=True)
    assert [r["step"] for r in rows] == list(range(1, stopped + 2))


def test_a_failing_rank_ends_the_job(tmp_path, warm_model_dir):
    """Rank 0 cannot open its metrics file (a folder stands in its place); rank 1 is fine and
    goes on to its first collective. The job must end, non-zero, with rank 0's error shown,
    long before any collective timeout."""
    out = tmp_path / "run"
    (out / "metrics.jsonl").mkdir(parents=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "cir", "train"]
    args = [*BASE, f"model.path={warm_model_dir}", f"run.out_dir={out}", "run.steps=2"]
    t0 = time.perf_counter()
    proc = subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "IsADirectoryError" in proc.stderr and "metrics.jsonl" in proc.stderr, proc.stderr[-3000:]
    assert time.perf_counter() - t0 < 240


# The demo's held-out set, sampled at temperature 1 as the demo does. 11 problems: shards of 6
# and 5, so uneven shards are covered.
@pytest.mark.slow
def test_demo_under_torchrun_gets_better_on_held_out_problems(tmp_path, warm_model_dir):
    """The issue's acceptance test: `torchrun --nproc_per_node=2 -m cir train` on the demo task
    finishes on CPU and its held-out accuracy goes up; tool use on the hard problems rises too.

    16 steps of 16 prompts x 8 samples from the warm start, 128 held-out problems sampled at
    temperature 1 before and after. With run seeds 0, 1, 2 (each its own held-out and training
    problems) accuracy went 0.52 -> 0.86, 0.42 -> 0.71, 0.53 -> 0.79 (gains 0.26 to 0.34), and
    hard-problem tool calls 0.54 -> 1.00, 0.49 -> 0.96, 0.57 -> 0.98. The margins below are about
    half the smallest gains: over 2 standard errors of the difference of two 128-sample
    accuracies (~0.06) below what was seen. About 70 s on 2 busy cores.

    Each held-out problem is sampled 4 times: one draw per problem measures the gain too loosely
    for the margin. Later, with the same trained weights, one draw measured a gain of 0.23 under
    the evaluation's former seeds and 0.13 under the seeds it shares with training now; four
    draws measure 0.19 and 0.18."""
    out = tmp_path / "run"
    rows = _train(
        out,
        warm_model_dir,
        "data.eval=[demo]",
        "demo.eval_problems=128",
        "demo.train_problems=400",
        "run.eval_at_start=true",
        "run.eval_temperature=1.0",
        "run.eval_samples=4",
        "run.eval_every=0",
        "run.save_every=0",
        "run.steps=16",
        "algo.prompts_per_step=16",
        "algo.group_size=8",
        # Room for a call, its output and the answer (the tests above need less); batched
        # decoding, as equality with another run is not what is tested here.
        "rollout.max_response_tokens=96",
        "run.engine_max_batch=64",
        ranks=2,
    )
    before, after = rows[0], rows[-1]
    assert before["step"] == 0 and after["step"] == 16
    assert before["eval/count"] == after["eval/count"] == 128 * 4
    trace = json.dumps({k: (round(before[k], 3), round(after[k], 3)) for k in before if k.startswith("eval/")})
    assert after["eval/accuracy"] > before["eval/accuracy"] + 0.15, trace
    assert after["eval/hard/tool_calls"] > before["eval/hard/tool_calls"] + 0.25, trace
    # Rank 0 wrote every held-out sample of both evaluations.
    assert len(_eval_rows(out, 0)) == len(_eval_rows(out, 16)) == 128 * 4
