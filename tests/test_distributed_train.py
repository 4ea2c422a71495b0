"""`torchrun --nproc_per_node=2 -m cir train` (FSDP2 over gloo, CPU) against one process on the same
global batch: the same rewards, losses and final weights within float tolerance, and a checkpoint
written by two ranks that one rank resumes."""

import json
import subprocess
import sys
import time

import pytest
import torch
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


@pytest.fixture(scope="module")
def warm_dir(tmp_path_factory):
    """The demo model after a short supervised warm start: some answers right, some wrong, so
    groups have reward variance and the updates are not zero."""
    from cir.tasks import demo

    tok = demo.demo_tokenizer()
    model = demo.demo_model(tok, hidden_size=64, num_layers=2, num_heads=4, seed=0)
    demo.warm_start(
        model,
        tok,
        steps=250,
        batch_size=16,
        lr=3e-3,
        tool_share={"hard": 0.4, "easy": 0.4},
        easy_share=0.25,
        feedback_template="```output\n{output}\n```\n",
        seed=0,
        exclude=set(),
        progress=False,
    )
    out = tmp_path_factory.mktemp("warm")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _train(out, warm_dir, *extra, ranks=1, resume=False):
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
    args = ["train", *BASE, f"model.path={warm_dir}", f"run.out_dir={out}", *extra] + (["--resume"] if resume else [])
    proc = subprocess.run([*launcher, *args], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _weights(out, step):
    return load_file(str(out / "checkpoints" / f"step_{step:06d}" / "model.safetensors"))


def _assert_close(a, b, atol):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=k)


def test_two_ranks_equal_one_process(tmp_path, warm_dir):
    one = _train(tmp_path / "one", warm_dir, "run.steps=2")
    two = _train(tmp_path / "two", warm_dir, "run.steps=2", ranks=2)
    assert [r["step"] for r in one] == [r["step"] for r in two] == [1, 2]
    assert one[0]["actor/grad_norm"] > 0, "no learning signal: the comparison would be empty"
    for a, b in zip(one, two):
        # Rollouts are the same samples (seeds follow a problem's global position), graded alike,
        # and rates are global (counts summed over ranks before dividing).
        for key in (
            "reward/mean",
            "tool/calls_per_traj",
            "tool/error_rate",
            "response/feedback_token_share",
            "response/model_tokens_mean",
            "data/trajectories",
        ):
            assert a[key] == b[key], (a["step"], key)
        for key in ("actor/loss", "actor/grad_norm", "actor/advantage_abs_mean"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (a["step"], key)
    # Before any update the weights are identical, so every sampled token is: the entropy of the
    # whole batch agrees to float rounding. After an update the two runs' weights differ in the
    # last bits (sums over ranks come in another order), which can flip a sampled token now and
    # then; in a group with no reward variance that changes the entropy but not the gradient.
    assert one[0]["actor/entropy"] == pytest.approx(two[0]["actor/entropy"], rel=1e-5)
    _assert_close(_weights(tmp_path / "one", 2), _weights(tmp_path / "two", 2), atol=1e-5)


def test_checkpoint_of_two_ranks_resumes_in_one(tmp_path, warm_dir):
    from transformers import AutoModelForCausalLM

    straight = _train(tmp_path / "straight", warm_dir, "run.steps=2")
    _train(tmp_path / "split", warm_dir, "run.steps=1", ranks=2)
    resumed = _train(tmp_path / "split", warm_dir, "run.steps=2", resume=True)
    assert [r["step"] for r in resumed] == [1, 2]
    assert resumed[-1]["reward/mean"] == straight[-1]["reward/mean"]
    assert resumed[-1]["actor/grad_norm"] == pytest.approx(straight[-1]["actor/grad_norm"], rel=1e-4)
    _assert_close(_weights(tmp_path / "straight", 2), _weights(tmp_path / "split", 2), atol=1e-5)
    # The folders are plain transformers models, and they predict alike.
    ids = torch.tensor([[5, 17, 29, 3, 40, 41, 42]])
    logits = {}
    for run in ("straight", "split"):
        model = AutoModelForCausalLM.from_pretrained(tmp_path / run / "checkpoints" / "step_000002").eval()
        with torch.no_grad():
            logits[run] = model(ids).logits
    assert torch.isfinite(logits["split"]).all()
    torch.testing.assert_close(logits["split"], logits["straight"], rtol=0, atol=1e-4)


def test_a_failing_rank_ends_the_job(tmp_path, warm_dir):
    """Rank 0 cannot open its metrics file (a folder stands in its place); rank 1 is fine and
    goes on to its first collective. The job must end, non-zero, with rank 0's error shown,
    long before any collective timeout."""
    out = tmp_path / "run"
    (out / "metrics.jsonl").mkdir(parents=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "cir", "train"]
    args = [*BASE, f"model.path={warm_dir}", f"run.out_dir={out}", "run.steps=2"]
    t0 = time.perf_counter()
    proc = subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "IsADirectoryError" in proc.stderr and "metrics.jsonl" in proc.stderr, proc.stderr[-3000:]
    assert time.perf_counter() - t0 < 240
