"""End-to-end trainer tests on the built-in demo task (tiny model, real sandbox, real rewards)."""

import json
import re

import pytest
import torch
from conftest import SMALL_DEMO_RUN
from safetensors.torch import load_file

from cir.cli import main
from cir.metrics import read_metrics
from cir.training.config import load_train_config
from cir.training.trainer import Trainer

# A small, fast version of the demo (its 2-layer 64-wide model, a short warm start).
FAST = ["demo.warmup_steps=40", "demo.warmup_batch=32", *SMALL_DEMO_RUN]


def _cfg(tmp_path, *extra):
    return load_train_config(None, [*FAST, f"run.out_dir={tmp_path}", *extra])


def _warm_cfg(tmp_path, warm_dir, *extra):
    return _cfg(tmp_path, f"model.path={warm_dir}", "data.prompt=demo", *extra)


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_resume_is_bit_exact(tmp_path, warm_model_dir, capsys):
    opts = ("run.eval_at_start=false", "data.eval=[]")
    straight, split = tmp_path / "straight", tmp_path / "split"
    cfg = lambda out, steps, *more: _warm_cfg(out, warm_model_dir, f"run.steps={steps}", *opts, *more)  # noqa: E731
    with Trainer(cfg(straight, 4)) as t:
        w_init = _weights(t.actor.model)
        t.fit()
        w_straight = _weights(t.actor.model)
    assert any(not torch.equal(w_init[k], w_straight[k]) for k in w_init), "training did not change the weights"
    with Trainer(cfg(split, 2, "run.save_every=1")) as t:  # checkpoints at steps 1 and 2
        t.fit()
    # As if the first run had logged step 3 and then stopped hard while writing step 4's line
    # (cut off mid-write), with its newest checkpoint's weights cut short (the data of a rename
    # that reached the disk before its files did).
    with open(split / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 3, "reward/mean": 123.0}) + "\n")
        f.write('{"step": 4, "reward/me')
    weights = split / "checkpoints" / "step_000002" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    capsys.readouterr()
    with Trainer(cfg(split, 4), resume=True) as t:
        assert t.step_count == 1  # step 2's checkpoint is skipped for step 1's
        t.fit()
        w_resumed = _weights(t.actor.model)
    said = capsys.readouterr().err
    assert "skipping" in said and "step_000002: model.safetensors is cut short" in said, said[-3000:]
    assert "cut off mid-write" in said, said[-3000:]
    assert w_straight.keys() == w_resumed.keys()
    for k in w_straight:
        assert torch.equal(w_straight[k], w_resumed[k]), f"{k} differs after resume"
    a = {r["step"]: r for r in read_metrics(straight / "metrics.jsonl")}
    rows_b = read_metrics(split / "metrics.jsonl")
    assert [r["step"] for r in rows_b].count(3) == 1, "the step logged before the crash must be redone, not repeated"
    b = {r["step"]: r for r in rows_b}
    for step in (3, 4):
        assert a[step]["actor/loss"] == b[step]["actor/loss"]
        assert a[step]["reward/mean"] == b[step]["reward/mean"]


def test_checkpoint_is_a_transformers_model(tmp_path):
    # The built-in demo path: model.path=demo builds and warm-starts the model itself.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with Trainer(_cfg(tmp_path, "run.steps=1", "run.eval_at_start=false", "data.eval=[]")) as t:
        result = t.fit()
        weights = _weights(t.actor.model)
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
    assert state["step"] == 1 and state["scheduler"]["last_epoch"] == 1 and len(state["rng"]) == 1
    # The optimizer's state is a torch.distributed.checkpoint: AdamW's moments for every parameter.
    from torch.distributed.checkpoint import FileSystemReader

    meta = FileSystemReader(f"{ckpt}/optimizer").read_metadata().state_dict_metadata
    moments = {k for k in meta if k.endswith(".exp_avg_sq")}
    assert len(moments) == len(list(model.parameters())), sorted(meta)[:6]
    assert (tmp_path / "config.yaml").is_file()
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert rows[-1]["step"] == 1
    for key in (
        "reward/mean",
        "tool/calls_per_traj",
        "actor/grad_norm",
        "actor/entropy",
        "actor/clipfrac_upper",
        "response/feedback_token_share",
        "time/update_s",
        "perf/tokens_per_s",
    ):
        assert key in rows[-1], key


def test_reward_goes_up_on_the_demo_task(tmp_path, warm_model_dir):
    """A short RL run from the warm start: mean training reward over the last steps beats the
    first steps, and tool use rises (the interpreter is what makes the hard problems solvable)."""
    cfg = _warm_cfg(
        tmp_path,
        warm_model_dir,
        "run.steps=16",
        "run.eval_at_start=false",
        "data.eval=[]",
        "algo.prompts_per_step=16",
        "algo.group_size=8",
    )
    with Trainer(cfg) as t:
        t.fit()
    rows = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "reward/mean" in r]
    mean = lambda key, part: sum(r[key] for r in part) / len(part)  # noqa: E731
    first, last = rows[:4], rows[-4:]
    trace = json.dumps([(round(r["reward/mean"], 3), round(r["tool/calls_per_traj"], 3)) for r in rows])
    assert mean("reward/mean", last) > mean("reward/mean", first) + 0.2, trace
    assert mean("tool/calls_per_traj", last) > mean("tool/calls_per_traj", first) + 0.1, trace


def test_held_out_samples_are_written_beside_the_metrics(tmp_path, warm_model_dir):
    cfg = _warm_cfg(tmp_path, warm_model_dir, "run.steps=1", "run.eval_at_start=true")
    with Trainer(cfg) as t:
        result = t.fit()
    for step, metrics in ((0, result["before"]), (1, result["after"])):
        path = tmp_path / "eval" / f"step_{step:06d}_demo.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        assert len(rows) == 24
        assert {"problem", "answer", "response", "correct", "reward", "tool_calls"} <= set(rows[0])
        # The file holds exactly the samples the logged metrics summarise.
        assert sum(r["correct"] for r in rows) / len(rows) == pytest.approx(metrics["eval/accuracy"])
        assert sum(r["tool_calls"] for r in rows) / len(rows) == pytest.approx(metrics["eval/tool_calls"])
    assert not list((tmp_path / "eval").glob("*.tmp"))
    # Resumed for one more step, the run still reports the evaluation before training (the
    # one logged at step 0), so the before/after summary survives a crash and --resume.
    with Trainer(_warm_cfg(tmp_path, warm_model_dir, "run.steps=2", "run.eval_at_start=true"), resume=True) as t:
        resumed = t.fit()
    assert resumed["before"] == result["before"]
    assert (tmp_path / "eval" / "step_000002_demo.jsonl").is_file()


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """The demo's model, untrained (512 positions, byte tokenizer), as a Hugging Face folder."""
    from cir.tasks import demo

    tok = demo.demo_tokenizer()
    model = demo.demo_model(tok, hidden_size=64, num_layers=2, num_heads=4, seed=0)
    out = tmp_path_factory.mktemp("tiny_demo_model")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_overlong_training_prompts_stop_cir_train_at_load_or_are_dropped(tmp_path, tiny_model_dir, capsys):
    # Two prompts longer than the model's 512 positions (one byte per token), at lines 2 and 5.
    rows = [{"problem": f"{a}+{b}", "answer": str(a + b)} for a, b in [(3, 4), (12, 5), (7, 8), (20, 22)]]
    rows.insert(1, {"problem": "1+" * 300 + "1", "answer": "301"})
    rows.insert(4, {"id": "long-2", "problem": "2*" * 400 + "2", "answer": "0"})
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    args = [
        *FAST,
        f"model.path={tiny_model_dir}",
        "data.prompt=demo",
        f"data.train={data}",
        "data.eval=[]",
        "run.steps=1",
        f"run.out_dir={tmp_path / 'run'}",
    ]

    # The real `cir train` path: one line, exit code 2, before the engine or the sandbox starts.
    code = main(["train", *args])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("cir ")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert lines[0].startswith(
        f"cir train: data.train={str(data)!r}: 2 of 6 prompts leave no room for a response in the model's "
        "context of 512 tokens: "
    ), lines[0]
    first_rows = re.search(
        rf"{re.escape(str(data))}:2 \(id train-1, (\d+) tokens\); {re.escape(str(data))}:5 \(id long-2, (\d+) tokens\)",
        lines[0],
    )
    assert first_rows and all(int(n) > 600 for n in first_rows.groups()), lines[0]
    assert "data.drop_overlong=true" in lines[0]

    # data.drop_overlong=true: the two are left out, with a count, and training runs.
    with Trainer(load_train_config(None, [*args, "data.drop_overlong=true"])) as t:
        assert [p.problem for p in t.train_problems] == ["3+4", "12+5", "7+8", "20+22"]
        t.fit()
    err = capsys.readouterr().err
    assert "2 of 6 prompts leave no room" in err and "left out (data.drop_overlong=true)" in err
    assert read_metrics(tmp_path / "run" / "metrics.jsonl")[-1]["step"] == 1
