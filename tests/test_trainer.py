"""End-to-end trainer tests on the built-in demo task (tiny model, real sandbox, real rewards)."""

import json

import pytest
import torch
from safetensors.torch import load_file

from cir.config import load_train_config
from cir.metrics import read_metrics
from cir.trainer import Trainer

# A small, fast version of the demo: 2-layer 64-dim model, a short warm start.
FAST = [
    "demo.hidden_size=64",
    "demo.num_layers=2",
    "demo.warmup_steps=40",
    "demo.warmup_batch=32",
    "demo.eval_problems=24",
    "demo.train_problems=400",
    "algo.prompts_per_step=4",
    "algo.group_size=4",
    "run.eval_every=0",
    "run.progress=false",
    "run.tensorboard=false",
    "run.plot=false",
    "run.threads=1",
    "sandbox.workers=2",
    "schedule=[]",
    "rollout.max_response_tokens=64",
]


def _cfg(tmp_path, *extra):
    return load_train_config(None, [*FAST, f"run.out_dir={tmp_path}", *extra])


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_resume_is_bit_exact(tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    with Trainer(_cfg(straight, "run.steps=4", "run.eval_at_start=false", "data.eval=[]")) as t:
        t.fit()
        w_straight = _weights(t.model)
    with Trainer(_cfg(split, "run.steps=2", "run.eval_at_start=false", "data.eval=[]")) as t:
        t.fit()
    with Trainer(_cfg(split, "run.steps=4", "run.eval_at_start=false", "data.eval=[]"), resume=True) as t:
        assert t.step_count == 2
        t.fit()
        w_resumed = _weights(t.model)
    assert w_straight.keys() == w_resumed.keys()
    for k in w_straight:
        assert torch.equal(w_straight[k], w_resumed[k]), f"{k} differs after resume"
    a = {r["step"]: r for r in read_metrics(straight / "metrics.jsonl")}
    b = {r["step"]: r for r in read_metrics(split / "metrics.jsonl")}
    for step in (3, 4):
        assert a[step]["actor/loss"] == b[step]["actor/loss"]
        assert a[step]["reward/mean"] == b[step]["reward/mean"]


def test_checkpoint_is_a_transformers_model(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with Trainer(_cfg(tmp_path, "run.steps=1", "run.eval_at_start=false", "data.eval=[]")) as t:
        result = t.fit()
        weights = _weights(t.model)
        probe = t.tokenizer.encode("Q: 12*34+5=?\n", add_special_tokens=False)
    ckpt = result["checkpoint"]
    model = AutoModelForCausalLM.from_pretrained(ckpt)
    tok = AutoTokenizer.from_pretrained(ckpt)
    assert tok.encode("Q: 12*34+5=?\n", add_special_tokens=False) == probe
    for k, v in model.state_dict().items():
        assert torch.equal(v, weights[k]), k
    saved = load_file(f"{ckpt}/model.safetensors")
    assert saved, "no tensors in model.safetensors"
    state = torch.load(f"{ckpt}/trainer_state.pt", weights_only=False)
    assert state["step"] == 1 and state["optimizer"]["state"], "optimizer state missing"
    assert (tmp_path / "config.yaml").is_file()
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert rows[-1]["step"] == 1
    for key in ("reward/mean", "tool/calls_per_traj", "actor/grad_norm", "actor/entropy", "actor/clipfrac_upper", "response/feedback_token_share", "time/update_s", "perf/tokens_per_s"):
        assert key in rows[-1], key


def test_reward_goes_up_on_the_demo_task(tmp_path):
    """A short RL run from a weak warm start: mean training reward over the last steps beats
    the first steps (the tool-using behaviour the warm start seeded gets reinforced)."""
    cfg = _cfg(
        tmp_path,
        "run.steps=12",
        "run.eval_at_start=false",
        "data.eval=[]",
        "algo.prompts_per_step=8",
        "algo.group_size=8",
        "optim.lr=2e-3",
        "demo.warmup_steps=120",
    )
    with Trainer(cfg) as t:
        t.fit()
    rows = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "reward/mean" in r]
    first = sum(r["reward/mean"] for r in rows[:3]) / 3
    last = sum(r["reward/mean"] for r in rows[-3:]) / 3
    tools_first = sum(r["tool/calls_per_traj"] for r in rows[:3]) / 3
    tools_last = sum(r["tool/calls_per_traj"] for r in rows[-3:]) / 3
    assert last > first + 0.2, json.dumps([(r["reward/mean"], r["tool/calls_per_traj"]) for r in rows])
    assert tools_last > tools_first
