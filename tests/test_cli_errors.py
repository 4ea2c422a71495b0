"""Bad input to `cir train` and `cir eval` ends within seconds with one line naming the key and
value and exit code 2: before any model is built, warm-started or loaded, and no traceback."""

import subprocess
import sys
import time
from pathlib import Path

import pytest

from cir.cli import main

BENCHMARK_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "benchmarks"

TRAIN_CASES = [
    (["data.train=/nonexistent.jsonl"], "cir train: data.train='/nonexistent.jsonl': "),
    (["data.eval=[aime42]"], "cir train: data.eval: "),
    (["model.path=/nonexistent"], "cir train: model.path='/nonexistent': no such model folder"),
    (["model.tokenizer=./no/such/dir"], "cir train: model.tokenizer='./no/such/dir': no such model folder"),
    (["data.prompt=nope"], "cir train: data.prompt='nope': unknown prompt template"),
    (["algo.aggregation=tokens"], "cir train: algo.aggregation='tokens': choose one of"),
]
EVAL_CASES = [
    (["--model", "/nonexistent"], "cir eval: --model='/nonexistent': no such model folder"),
    (
        ["--model", "org/model", "--benchmarks", "math500,math5000", "--benchmark-dir", str(BENCHMARK_DIR)],
        "cir eval: --benchmarks: math5000: ",
    ),
    (["--model", "org/model", "--prompt", "nope"], "cir eval: --prompt nope: unknown prompt template"),
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
