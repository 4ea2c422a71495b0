"""`cir bench kernels`: the CPU section runs end to end and writes its JSON and PNG."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from cir.bench import kernels as bench

HAS_CUDA = torch.cuda.is_available()


def _run_cli(tmp_path, *extra: str, timeout: float = 240) -> tuple[subprocess.CompletedProcess, dict]:
    out_json, out_png = tmp_path / "sub" / "kernels.json", tmp_path / "kernels.png"
    env = dict(os.environ)
    # The command must enable Triton's interpreter by itself on a CPU-only machine.
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "cir",
            "bench",
            "kernels",
            "--quick",
            "--json",
            str(out_json),
            "--plot",
            str(out_png),
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    height, width = matplotlib.image.imread(str(out_png)).shape[:2]
    assert height > 100 and width > 300
    return proc, json.loads(out_json.read_text())


@pytest.mark.skipif(HAS_CUDA, reason="the CPU section runs only without CUDA")
def test_quick_cpu_run_writes_json_and_plot(tmp_path):
    proc, report = _run_cli(tmp_path)
    assert report["device"] == "cpu" and report["cuda"] is False
    assert report["gpu_measurements"].startswith("not run")
    assert "need CUDA" in proc.stdout
    assert "gpu" not in report

    # Correctness spot checks: the interpreted Triton kernels and the fallback, each passing.
    names = report["checks_ran"]
    assert any(n.startswith("linear_logprob triton (interpreter)") for n in names)
    assert any(n.startswith("linear_logprob torch") for n in names)
    assert any("policy_loss triton (interpreter)" in n and "padded" in n for n in names)
    assert any("policy_loss triton (interpreter)" in n and "packed" in n for n in names)
    for check in report["checks"]:
        assert check["ok"], check
        assert check["max_abs_err"] and all(math.isfinite(v) for v in check["max_abs_err"].values())
        assert check["max_rel_err"] <= check["tolerance"]
    policy = next(c for c in report["checks"] if c["name"].startswith("policy_loss"))
    assert {"loss", "dlogprob", "clipfrac_upper", "approx_kl"} <= set(policy["max_abs_err"])

    # CPU timings: both implementations, both modes, every shape; measured numbers.
    rows = report["cpu"]["linear_logprob"]
    shapes = {(r["shape"]["N"], r["shape"]["H"], r["shape"]["V"]) for r in rows}
    assert shapes == set(bench.QUICK_CPU_SHAPES)
    assert {(r["impl"], r["mode"]) for r in rows} == {(i, m) for i in ("naive", "chunked") for m in ("fwd", "fwd+bwd")}
    assert all(r["status"] == "ok" and r["ms"] > 0 for r in rows)
    # The point of the fallback: at the larger vocabulary the naive form's peak is higher.
    big = max(shapes, key=lambda s: s[2])
    peak = {
        (r["impl"], r["mode"]): r["peak_mib"]
        for r in rows
        if (r["shape"]["N"], r["shape"]["H"], r["shape"]["V"]) == big
    }
    if rows[0]["extra"]["rss_tracks_frees"]:
        assert peak[("naive", "fwd+bwd")] > peak[("chunked", "fwd+bwd")] > 0


def test_bad_shape_is_a_clear_error():
    with pytest.raises(SystemExit, match="NxHxV"):
        bench._parse_shapes(["16384x3584"])
    assert bench._parse_shapes(["16384x3584x151936", "4,5,6"]) == [(16384, 3584, 151936), (4, 5, 6)]


def test_table_is_aligned():
    text = bench._format_table([{"a": "x", "b": 1.23456}, {"a": "longer", "b": None}], [("a", "name"), ("b", "value")])
    lines = text.splitlines()
    assert len({len(line) for line in lines}) == 1
    assert "1.235" in text and lines[3].rstrip().endswith("-")


def test_matmul_path_names_the_non_tensor_core_fp32_case():
    assert "not the tensor cores" in bench.matmul_path("fp32")
    assert "tensor cores" in bench.matmul_path("bf16") and "not" not in bench.matmul_path("bf16")


@pytest.mark.gpu
def test_quick_gpu_run_reports_every_section(tmp_path):
    # One shape with every baseline, torch.compile and Triton's autotuning included: a couple of
    # minutes, within one 600 s device command (scripts/device_check.py runs the full targets).
    _, report = _run_cli(tmp_path, "--shapes", "2048x2048x32000", "--policy-tokens", "65536", timeout=300)
    assert report["cuda"] is True and report["gpu_measurements"] == "ran"
    gpu = report["gpu"]
    assert gpu["dtype"] == "bf16" and gpu["matmul_path"].startswith("bf16 inputs: tensor cores")
    assert all(c["ok"] for c in report["checks"])
    ours = [t for t in gpu["linear_logprob"] if t["impl"] == "ours"]
    assert ours and all(t["status"] == "ok" and t["ms"] > 0 and t["extra"]["tflops"] > 0 for t in ours)
    assert any(t["extra"].get("roofline_frac") for t in ours)
    assert gpu["copy"]["extra"]["gbps"] > 0
    assert all(t["extra"].get("graph_ms") for t in gpu["policy_loss"]), gpu["policy_loss"]
    assert {(t["impl"], t["mode"]) for t in gpu["policy_loss"]} == {
        (i, m) for i in ("ours", "eager") for m in ("fwd", "fwd+bwd")
    }
