"""`cir eval` end to end: a tiny model (junk outputs) with the real sandbox and the `hf` engine
over a 5-problem slice of every benchmark file; the files it writes, their agreement with the
per-sample JSONL, resume after a kill, and bad input refused before anything is written."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from math import comb
from pathlib import Path

import pytest
import yaml

from cir.cli import main
from cir.data import BENCHMARKS

BENCHMARK_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "benchmarks"
SAMPLES = 4


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from cir.models import tiny_causal_lm
    from cir.tokenization import byte_tokenizer

    folder = tmp_path_factory.mktemp("tiny")
    tok = byte_tokenizer()
    # Byte tokens: the benchmark prompts take ~500-2000 tokens, so the context must be long.
    model = tiny_causal_lm(tok, hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2, max_position_embeddings=4096)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _args(model_dir, out, *extra):
    return [
        "eval",
        "--model",
        str(model_dir),
        "--benchmark-dir",
        str(BENCHMARK_DIR),
        "--limit",
        "5",
        "--samples",
        str(SAMPLES),
        "--max-response-tokens",
        "48",
        "--workers",
        "2",
        "--out",
        str(out),
        *extra,
    ]


@pytest.fixture(scope="module")
def first_run(model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "out"
    assert main(_args(model_dir, out)) == 0
    return out


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_every_benchmark_is_evaluated_and_reported_consistently_with_its_samples(first_run):
    out = first_run
    results = json.loads((out / "results.json").read_text())
    report = (out / "report.md").read_text()
    assert (out / "pass_at_k.png").read_bytes()[:4] == b"\x89PNG"
    assert not list(out.glob("*.tmp*"))
    assert sorted(results["benchmarks"]) == sorted(BENCHMARKS)
    for name, m in results["benchmarks"].items():
        rows = _rows(out / f"{name}.jsonl")
        assert [(r["index"], r["sample"]) for r in rows] == [(i, s) for i in range(5) for s in range(SAMPLES)]
        for r in rows:
            assert {"prompt", "response", "segments", "extracted_answer", "correct", "calls"} <= set(r)
            assert "".join(s["text"] for s in r["segments"]) == r["response"]
            assert r["prompt"].endswith("Solution:\n") and "\\boxed{}" in r["prompt"]
        assert m["problems"] == 5 and m["samples"] == SAMPLES
        assert m["protocol"] == ("greedy" if name == "math500" else f"avg@{SAMPLES}")
        assert m["score"] == pytest.approx(sum(r["correct"] for r in rows) / len(rows))
        for k, value in m["pass@k"].items():
            per_problem = [sum(r["correct"] for r in rows if r["index"] == i) for i in range(5)]
            expected = sum(1 - comb(SAMPLES - c, int(k)) / comb(SAMPLES, int(k)) for c in per_problem) / 5
            assert value == pytest.approx(expected)
        assert list(m["maj@k"]) == ["1", "2", "4"]
        assert m["tool_calls"] == pytest.approx(sum(r["tool_calls"] for r in rows) / len(rows))
        assert m["model_tokens"] == pytest.approx(sum(r["model_tokens"] for r in rows) / len(rows))
        assert m["truncation_rate"] == pytest.approx(sum(r["finish_reason"] == "length" for r in rows) / len(rows))
        # The report's table row: name, problems, protocol, score, the paper's number.
        line = next(line for line in report.splitlines() if line.startswith(f"| {name} | 5 |"))
        assert f"| {100 * m['score']:.1f} |" in line
    assert "| math500 | 5 | greedy |" in report and "| 86.4 |" in report
    assert re.search(r"\| \*\*average\*\* \| \| \| [\d.]+ \| 52.4 \|", report)
    assert "## math500 by subject" in report and "## math500 by level" in report
    assert "## olymmath-en-hard by subject" in report
    assert results["overall"]["score"] == pytest.approx(
        sum(m["score"] for m in results["benchmarks"].values()) / len(BENCHMARKS)
    )


def test_a_killed_run_resumes_with_the_same_results_reusing_what_was_written(first_run, model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(first_run, out)
    reference = json.loads((out / "results.json").read_text())
    for name in ("results.json", "report.md", "pass_at_k.png"):
        (out / name).unlink()
    # As a kill leaves it: aime24 two problems in plus half a line, amc23 untouched, math500 nothing.
    lines = (out / "aime24.jsonl").read_text().splitlines(keepends=True)
    (out / "aime24.jsonl").write_text("".join(lines[: 2 * SAMPLES]) + lines[2 * SAMPLES][:40])
    (out / "math500.jsonl").unlink()
    kept = 6 * 5 * SAMPLES - 3 * SAMPLES - 5 * SAMPLES
    capsys.readouterr()
    assert main(_args(model_dir, out)) == 0
    printed = capsys.readouterr().out
    assert f"aime24: reused {2 * SAMPLES} of {5 * SAMPLES} samples" in printed
    assert "math500: reused" not in printed
    resumed = json.loads((out / "results.json").read_text())
    assert resumed["run"]["reused_samples"] == kept
    assert resumed["benchmarks"] == reference["benchmarks"]
    assert resumed["overall"] == reference["overall"]
    for name in BENCHMARKS:
        assert _rows(out / f"{name}.jsonl") == _rows(first_run / f"{name}.jsonl"), name


def test_a_run_killed_mid_way_loses_only_problems_in_flight_and_resumes(model_dir, tmp_path, capsys):
    # Two sequences decoded at a time, so problems finish one after another and a kill lands mid-way.
    slow = ["--benchmarks", "aime24", "--limit", "6", "--max-response-tokens", "160"]
    out = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "cir", *_args(model_dir, out, *slow, "--max-batch", "2")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    samples = out / "aime24.jsonl"
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        if samples.is_file() and samples.read_text().count("\n") >= SAMPLES:
            break
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    written = samples.read_text().count("\n")
    if written >= 6 * SAMPLES:
        pytest.skip("the run finished before it could be killed")
    assert written % SAMPLES == 0 and not (out / "results.json").exists()  # whole problems only

    assert main(_args(model_dir, out, *slow)) == 0
    assert f"aime24: reused {written} of {6 * SAMPLES} samples" in capsys.readouterr().out
    reference = tmp_path / "straight"
    assert main(_args(model_dir, reference, *slow)) == 0
    assert _rows(samples) == _rows(reference / "aime24.jsonl")
    resumed, straight = (json.loads((d / "results.json").read_text()) for d in (out, reference))
    assert resumed["benchmarks"] == straight["benchmarks"]


def test_bad_input_names_what_is_wrong_and_writes_nothing(model_dir, tmp_path, capsys):
    no_answer = tmp_path / "no_answer.jsonl"
    no_answer.write_text('{"problem": "1+1?", "answer": "2"}\n{"problem": "2+2?"}\n')
    twice = tmp_path / "twice.jsonl"
    twice.write_text('{"id": 1, "problem": "1+1?", "answer": "2"}\n{"id": 1, "problem": "2+2?", "answer": "4"}\n')
    cases = [
        (["--benchmarks", "aime24,aime2024"], "cir eval: --benchmarks: aime2024: unknown benchmark; known: aime24"),
        (["--benchmarks", str(no_answer)], f"cir eval: --benchmarks: {no_answer}: {no_answer}:2: no answer field"),
        (["--samples", "0"], "cir eval: --samples 0: must be >= 1"),
        (["--benchmarks", str(twice)], f"cir eval: --benchmarks: {twice}: problem id '1' appears twice"),
    ]
    for extra, message in cases:
        out = tmp_path / "out"
        assert main(_args(model_dir, out, *extra)) == 2
        err = capsys.readouterr().err
        assert err.startswith(message), err
        assert not out.exists()
    missing = tmp_path / "no-model"
    args = _args(model_dir, tmp_path / "out")
    args[args.index(str(model_dir))] = str(missing)
    assert main(args) == 2
    assert capsys.readouterr().err.startswith(f"cir eval: --model='{missing}': no such model folder")
    assert not (tmp_path / "out").exists()


def test_an_overlong_prompt_is_refused_by_the_rule_cir_train_applies(model_dir, tmp_path, capsys):
    long = tmp_path / "long.jsonl"
    long.write_text(
        json.dumps({"problem": "1+1?", "answer": "2"})
        + "\n"
        + json.dumps({"problem": "x" * 5000, "answer": "1"})
        + "\n"
    )
    out = tmp_path / "out"
    assert main(_args(model_dir, out, "--benchmarks", str(long))) == 2
    (err,) = [
        line for line in capsys.readouterr().err.splitlines() if line.startswith("cir ")
    ]  # after the model loaded
    assert err.startswith(
        f"cir eval: --benchmarks: {long}: 1 of 2 prompts leave no room for a response in the model's context of "
        f"4096 tokens: {long}:2 (id long-1, "
    ), err
    assert not out.exists()


def test_an_out_folder_from_other_settings_is_refused_untouched(first_run, model_dir, capsys):
    before = {p.name: p.stat().st_mtime_ns for p in first_run.iterdir()}
    assert main(_args(model_dir, first_run, "--tool-budget", "1")) == 2
    assert "its samples were made with tool_budget=4, now 1; use another --out" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in first_run.iterdir()} == before


def test_settings_from_a_config_file_are_those_of_the_flags(first_run, model_dir, tmp_path, capsys):
    # The same settings as `_args`, written as a file: the run they describe is the first one,
    # so every sample is reused (an --out made with other settings would be refused).
    settings = {
        "model": str(model_dir),
        "benchmark_dir": str(BENCHMARK_DIR),
        "limit": 5,
        "samples": SAMPLES,
        "max_response_tokens": 48,
        "workers": 2,
    }
    config = tmp_path / "eval.yaml"
    config.write_text(yaml.safe_dump(settings))
    out = tmp_path / "out"
    shutil.copytree(first_run, out)
    capsys.readouterr()
    assert main(["eval", "--config", str(config), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    for name in BENCHMARKS:
        assert f"{name}: reused {5 * SAMPLES} of {5 * SAMPLES} samples" in printed, name
    reference, again = (json.loads((d / "results.json").read_text()) for d in (first_run, out))
    assert again["benchmarks"] == reference["benchmarks"]
    # A flag given beside the file wins over it.
    assert main(["eval", "--config", str(config), "--out", str(out), "--tool-budget", "1"]) == 2
    assert "its samples were made with tool_budget=4, now 1" in capsys.readouterr().err
