"""scripts/device_check.py --cpu: every step of the GPU device check at tiny sizes on the CPU, in
this environment, within two minutes, so that a change which breaks the check fails here and
not on the next lent GPU. The summary's content is checked, not only the exit code."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_device_check_runs_every_step_on_the_cpu(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "device_check.py"), "--cpu", "--out", str(out), "--work", str(tmp_path)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OUT": str(tmp_path / "unused")},
    )  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    steps = {s["name"]: s for s in summary["steps"]}
    assert proc.returncode == 0, (proc.stdout[-3000:], {n: (s["status"], s["errors"]) for n, s in steps.items()})
    assert summary["mode"] == "cpu" and summary["ok"] and summary["total_s"] < summary["budget_s"] == 120
    assert list(steps) == [
        "environment", "install", "gpu tests", "cpu torchrun tests", "kernels", "step", "train", "async"
    ]  # fmt: skip
    assert steps["install"]["status"] == "skipped" and all(
        s["status"] == "ok" for n, s in steps.items() if n != "install"
    )
    env = steps["environment"]["figures"]
    assert env["cuda_available"] is False and env["torch"] and "torchrun_shutdown_timeout" in env
    # Every GPU-only test was collected and, without CUDA, skipped (never counted as passing).
    gpu = steps["gpu tests"]["figures"]
    assert gpu["tests"] > 10 and gpu["skipped"] == gpu["tests"] and gpu["passed"] == 0
    assert "tests/test_weight_handoff_streams.py" in gpu["files"]
    # The gloo gather test ran under torchrun with CUDA hidden.
    assert steps["cpu torchrun tests"]["figures"]["passed"] >= 1
    kernels = steps["kernels"]["figures"]
    assert kernels["checks_ok"] and kernels["cpu_chunked_time_vs_naive"] > 0
    step = steps["step"]["figures"]
    assert step["update_over_floor"] > 1 and step["tokens_per_s"] > 0 and step["generated_tokens_per_s"] > 0
    assert set(step["phase_shares"]) >= {"forward", "backward", "optimizer"}
    train = steps["train"]["figures"]
    assert train["device"] == "cpu" and train["steps_logged"] == 2 and "reward/mean" in train
    both = steps["async"]["figures"]  # the collectors' long-tail benchmark, side by side
    assert both["device"] == "cpu" and both["async_over_sync"] > 0 and both["sync_steps_per_min"] > 0
    assert both["model_parameters_m"] > 0 and both["staleness_max"] <= 1
    # The GPU targets are listed, not judged, on a CPU; what the image cannot measure is named.
    assert set(summary["targets"]) and all(t["result"] == "not applicable (CPU)" for t in summary["targets"].values())
    assert any("sleep level 1" in k for k in summary["unmeasured"])
    md = (out / "summary.md").read_text()
    assert "| kernels | ok |" in md and "## Targets" in md and "## Not measured here" in md
    assert all((out / name).exists() for name in ("kernels.json", "step.json", "async.json", "log.txt"))
    assert not (tmp_path / "unused").exists()  # --out wins over $OUT
