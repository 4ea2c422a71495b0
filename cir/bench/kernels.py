"""`cir bench kernels`: the fused log-prob and policy-loss kernels against torch baselines.

On a CUDA device, for a grid of (N tokens, H hidden, V vocabulary) shapes it times the
forward (no-grad: the old/ref log-prob pass) and the forward+backward (the training step) of

- `ours`: `linear_logprob(impl="triton")`, never holding the [N, V] logits;
- `naive`: torch as usually written (bf16 matmul, logits in fp32, log_softmax, gather);
- `chunked`: `linear_logprob(impl="torch")`, the bounded-memory torch fallback;
- `compiled`: `torch.compile` of the naive form;
- `liger`: Liger-Kernel's fused linear cross entropy (reduction="sum"; the same computation at
  temperature 1) when `liger_kernel` imports;

with the peak extra memory of each (torch.cuda.max_memory_allocated over the allocation
before the call), TFLOP/s of useful work (2NHV forward, 6NHV forward+backward) and the
fraction of the matmul roofline measured in the same run (plain bf16 matmuls of the same
shapes: logits, dhidden, dweight). For `policy_loss` on ~1M tokens it times ours against
the eager torch reference and reports GB/s of the minimal traffic against a device-to-device
copy measured in the same run. Timings are medians of `triton.testing.do_bench` (which
warms up and flushes the L2 cache before every repetition, so inputs need no rotation).

Without CUDA it says so, and runs what is honest on a CPU: correctness spot checks (the
Triton kernels through Triton's interpreter, and the chunked fallback, against float64
references, with max errors), and timings and peak memory (peak RSS) of the chunked fallback
against the naive form on moderate shapes. The JSON records `"device": "cpu"` and which
checks ran. Exit status 1 when a correctness check fails.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field

DEFAULT_N = (4096, 16384, 32768)
DEFAULT_H = (2048, 3584, 4096)
DEFAULT_V = (32000, 128256, 151936)
QUICK_GPU_SHAPES = ((2048, 2048, 32000), (4096, 3584, 151936))
CPU_SHAPES = ((1024, 512, 32000), (1024, 512, 128256))
QUICK_CPU_SHAPES = ((512, 64, 8192), (512, 64, 32000))
POLICY_TOKENS = 1 << 20  # 256 sequences x 4096 tokens
QUICK_POLICY_TOKENS = 1 << 16
POLICY_SEQ_LEN = 4096
COPY_BYTES = 1 << 30  # the device copy that sets the bandwidth yardstick
IMPLS = ("ours", "naive", "chunked", "compiled", "liger")
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


@dataclass
class Timing:
    """One measured (shape, implementation, mode) cell."""

    section: str  # "linear_logprob" | "policy_loss" | "roofline" | "copy"
    impl: str
    mode: str  # "fwd" | "fwd+bwd"
    shape: dict
    ms: float | None = None
    peak_mib: float | None = None
    status: str = "ok"  # "ok" | "oom" | "unavailable: ..." | "error: ..."
    extra: dict = field(default_factory=dict)


@dataclass
class Check:
    """One correctness spot check: max abs / relative errors against a float64 reference."""

    name: str
    shape: dict
    max_abs_err: dict
    max_rel_err: float
    tolerance: float
    ok: bool
    note: str = ""


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--quick",
        action="store_true",
        help="small shapes for a smoke run (CPU: well under a minute; GPU: two shapes, 64k-token policy loss)",
    )
    parser.add_argument("--json", metavar="PATH", help="write every measurement and check to this JSON file")
    parser.add_argument("--plot", metavar="PATH.png", help="write a PNG plot of the timings and peak memory")
    parser.add_argument(
        "--shapes",
        nargs="+",
        metavar="NxHxV",
        help="linear_logprob shapes, e.g. 16384x3584x151936 (default on GPU: the product of "
        f"N={DEFAULT_N}, H={DEFAULT_H}, V={DEFAULT_V}; on CPU: {['x'.join(map(str, s)) for s in CPU_SHAPES]})",
    )
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), default="bf16", help="hidden/weight dtype on GPU (default bf16)"
    )
    parser.add_argument("--with-entropy", action="store_true", help="time linear_logprob with the entropy output too")
    parser.add_argument(
        "--impls",
        nargs="+",
        choices=IMPLS,
        default=list(IMPLS),
        help="linear_logprob implementations to time on GPU (the CPU section times naive and chunked)",
    )
    parser.add_argument(
        "--policy-tokens",
        type=int,
        default=None,
        help=f"tokens for the policy_loss timing (default {POLICY_TOKENS}; --quick {QUICK_POLICY_TOKENS})",
    )


# ---------------------------------------------------------------------------- shared helpers


def matmul_path(dtype_name: str) -> str:
    """Which units `linear_logprob`'s Triton kernels multiply on for inputs of `dtype_name`."""
    if dtype_name == "fp32":
        return (
            "fp32 inputs: tl.dot with input_precision='ieee' on the CUDA cores, not the tensor cores (tf32 "
            "would cost ~1e-3 relative on the logits), so fp32 timings are not the bf16 targets' case"
        )
    return f"{dtype_name} inputs: tensor cores (tl.dot, fp32 accumulation)"


def _parse_shapes(specs: list[str] | None) -> list[tuple[int, int, int]] | None:
    if not specs:
        return None
    shapes = []
    for spec in specs:
        parts = re.split(r"[x,]", spec.lower())
        if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise SystemExit(f"cir bench kernels: --shapes entry {spec!r} is not NxHxV with positive integers")
        shapes.append(tuple(int(p) for p in parts))
    return shapes


def _shape(n: int, h: int, v: int) -> dict:
    return {"N": n, "H": h, "V": v}


def _naive_logprob(hidden, weight, targets, with_entropy: bool = False):
    """Log-probs the way plain torch code computes them: whole logits, log_softmax, gather."""
    import torch

    logits = (hidden @ weight.T).float()
    logp = torch.log_softmax(logits, dim=-1)
    logprob = logp.gather(1, targets[:, None]).squeeze(1)
    entropy = -(logp.exp() * logp).sum(-1) if with_entropy else None
    return logprob, entropy


def _backward_of(outputs) -> None:
    logprob, entropy = outputs
    total = logprob.sum() if entropy is None else logprob.sum() + entropy.sum()
    total.backward()


def _max_err(got, want) -> tuple[float, float]:
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    abs_err = float((got - want).abs().max()) if got.numel() else 0.0
    scale = float(want.abs().max()) if want.numel() else 0.0
    if not math.isfinite(abs_err):
        return float("inf"), float("inf")
    return abs_err, abs_err / max(scale, 1e-30)


def _format_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """Aligned text table; `columns` are (key, header)."""

    def cell(v) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"
        return str(v)

    body = [[cell(r.get(k)) for k, _ in columns] for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, (_, h) in enumerate(columns)]
    lines = ["  ".join(h.rjust(w) for (_, h), w in zip(columns, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.rjust(w) for c, w in zip(b, widths)) for b in body]
    return "\n".join(lines)


def _progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- correctness checks


def run_checks(device: str, quick: bool) -> list[Check]:
    """Triton kernels (interpreter on CPU) and the chunked fallback vs float64 references."""
    import torch

    from cir.kernels.linear_logprob import linear_logprob
    from cir.kernels.linear_logprob_ref import linear_logprob_reference
    from cir.kernels.policy_loss import policy_loss, triton_available_for
    from cir.kernels.policy_loss_ref import policy_loss_reference

    checks: list[Check] = []
    gen = torch.Generator().manual_seed(0)
    triton_ok = triton_available_for(torch.empty(0, device=device))

    # linear_logprob: temperature != 1, entropy, an ignored row; outputs and both gradients.
    n, h, v = (19, 32, 300) if quick else (37, 64, 1000)
    hidden = torch.randn(n, h, generator=gen, dtype=torch.float64)
    weight = torch.randn(v, h, generator=gen, dtype=torch.float64) * 0.3
    targets = torch.randint(0, v, (n,), generator=gen)
    targets[3] = -100
    g_lp, g_ent = torch.randn(n, generator=gen, dtype=torch.float64), torch.randn(n, generator=gen, dtype=torch.float64)

    def lin_grads(fn, dtype):
        hd = hidden.to(device=device, dtype=dtype).clone().requires_grad_(True)
        wt = weight.to(device=device, dtype=dtype).clone().requires_grad_(True)
        lp, ent = fn(hd, wt, targets.to(device), temperature=0.7, with_entropy=True)
        ((lp.double() * g_lp.to(device)).sum() + (ent.double() * g_ent.to(device)).sum()).backward()
        return {"logprob": lp, "entropy": ent, "dhidden": hd.grad, "dweight": wt.grad}

    want = lin_grads(linear_logprob_reference, torch.float64)
    for impl in ("triton", "torch"):
        if impl == "triton" and not triton_ok:
            continue
        got = lin_grads(lambda *a, **k: linear_logprob(*a, impl=impl, **k), torch.float32)
        errs = {k: _max_err(got[k], want[k]) for k in want}
        rel = max(e[1] for e in errs.values())
        label = "triton (interpreter)" if impl == "triton" and device == "cpu" else impl
        checks.append(
            Check(
                name=f"linear_logprob {label} fp32 vs float64 reference",
                shape=_shape(n, h, v) | {"temperature": 0.7},
                max_abs_err={k: e[0] for k, e in errs.items()},
                max_rel_err=rel,
                tolerance=1e-4,
                ok=rel <= 1e-4,
                note="logprob, entropy, dhidden, dweight; one ignored row",
            )
        )

    # policy_loss: padded and packed, k3 KL and entropy terms, feedback-like mask.
    if triton_ok:
        B, T = (3, 300) if quick else (4, 700)
        lp = -torch.rand(B, T, generator=gen, dtype=torch.float64) * 3
        old = lp + torch.randn(B, T, generator=gen, dtype=torch.float64) * 0.5
        # The gradient jumps at the clip edges (0.8, 1.28, 3.0 here); keep ratios 1e-4 away so
        # that fp32 rounding (approximate exp on GPUs) cannot put a token on the other side.
        ratio = (lp - old).exp()
        near = torch.zeros_like(ratio, dtype=torch.bool)
        for edge in (0.8, 1.28, 3.0):
            near |= (ratio / edge - 1).abs() < 1e-4
        old = torch.where(near, old - 1e-3, old)
        inputs = dict(
            logprob=lp,
            old_logprob=old,
            advantages=torch.randn(B, T, generator=gen, dtype=torch.float64),
            loss_mask=torch.rand(B, T, generator=gen) > 0.3,
            ref_logprob=lp + torch.randn(B, T, generator=gen, dtype=torch.float64) * 0.5,
            entropy=torch.rand(B, T, generator=gen, dtype=torch.float64),
        )
        inputs["loss_mask"][:, 40:90] = False  # an interpreter-output span
        inputs["loss_mask"][1] = False  # an all-masked row
        lengths = [T, T // 3, 0][:B] + [T // 2] * max(0, B - 3)
        kw = dict(kl_coef=0.1, kl_type="k3", entropy_coef=0.01, aggregation="seq-mean-token-mean")

        def pl_run(fn, dtype, layout):
            x = {k: (t.to(dtype) if t.is_floating_point() else t).to(device).clone() for k, t in inputs.items()}
            extra = {}
            if layout == "packed":
                x = {k: torch.cat([t[b, :m] for b, m in enumerate(lengths)]) for k, t in x.items()}
                cu = torch.tensor([0] + lengths, device=device).cumsum(0)
                extra = {"cu_seqlens": cu}
            x["logprob"].requires_grad_(True)
            x["entropy"].requires_grad_(True)
            loss, metrics = fn(**x, **kw, **extra)
            loss.backward()
            return {"loss": loss, **metrics, "dlogprob": x["logprob"].grad, "dentropy": x["entropy"].grad}

        for layout in ("padded", "packed"):
            want = pl_run(policy_loss_reference, torch.float64, layout)
            got = pl_run(lambda **k: policy_loss(**k, impl="triton"), torch.float32, layout)
            errs = {k: _max_err(got[k], want[k]) for k in want}
            rel = max(e[1] for e in errs.values())
            label = "triton (interpreter)" if device == "cpu" else "triton"
            checks.append(
                Check(
                    name=f"policy_loss {label} fp32 vs float64 reference, {layout}",
                    shape={"B": B, "T": T},
                    max_abs_err={k: e[0] for k, e in errs.items()},
                    max_rel_err=rel,
                    tolerance=1e-4,
                    ok=rel <= 1e-4,
                    note="loss, every metric, dlogprob, dentropy; seq-mean-token-mean, k3 KL, entropy bonus",
                )
            )
    return checks


# ---------------------------------------------------------------------------- CPU section


def _rss_mib(field_name: str) -> float | None:
    try:
        text = open("/proc/self/status").read()
    except OSError:
        return None
    m = re.search(rf"{field_name}:\s+(\d+) kB", text)
    return int(m.group(1)) / 1024 if m else None


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM (the peak resident set) to the current RSS
        return True
    except OSError:
        return False


def _release_large_frees_to_os() -> bool:
    """Make glibc return every large free to the OS, so that peak RSS measures live tensors.

    By default glibc raises its mmap threshold after large frees and then keeps freed blocks in
    the heap, where a later call reuses them without growing the RSS; a fixed threshold (and
    trim threshold) turns that off. Returns False where this is not glibc.
    """
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_mmap_threshold, 1 << 17)) and bool(libc.mallopt(m_trim_threshold, 1 << 17))
    except (OSError, AttributeError):
        return False


def _cpu_measure(fn, reps: int) -> tuple[float, float | None]:
    """Median wall time (ms) over `reps` calls after one warm-up, and the peak RSS growth (MiB)."""
    fn()
    gc.collect()
    times = []
    peak = None
    for i in range(reps):
        gc.collect()
        if i == 0 and _reset_peak_rss():
            base = _rss_mib("VmRSS")
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
            hwm = _rss_mib("VmHWM")
            peak = None if base is None or hwm is None else max(0.0, hwm - base)
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), peak


def run_cpu_timings(shapes, quick: bool) -> list[Timing]:
    import torch

    from cir.kernels.linear_logprob import linear_logprob

    results: list[Timing] = []
    reps = 2 if quick else 5
    exact_rss = _release_large_frees_to_os()
    for i, (n, h, v) in enumerate(shapes):
        _progress(f"[cpu {i + 1}/{len(shapes)}] N={n} H={h} V={v}")
        gen = torch.Generator().manual_seed(i)
        hidden = torch.randn(n, h, generator=gen) * 0.5
        weight = torch.randn(v, h, generator=gen) * 0.05
        targets = torch.randint(0, v, (n,), generator=gen)
        impls = {
            "naive": lambda hd, wt: _naive_logprob(hd, wt, targets),
            "chunked": lambda hd, wt: linear_logprob(hd, wt, targets, impl="torch"),
        }
        hd, wt = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        for impl, f in impls.items():
            for mode in ("fwd", "fwd+bwd"):

                def call(f=f, mode=mode):
                    if mode == "fwd":
                        with torch.no_grad():
                            f(hidden, weight)
                    else:
                        hd.grad = wt.grad = None  # the gradients themselves count in every impl's peak
                        _backward_of(f(hd, wt))

                ms, peak = _cpu_measure(call, reps)
                results.append(
                    Timing(
                        "linear_logprob",
                        impl,
                        mode,
                        _shape(n, h, v),
                        ms=ms,
                        peak_mib=peak,
                        extra={"dtype": "fp32", "threads": torch.get_num_threads(), "rss_tracks_frees": exact_rss},
                    )
                )
    return results


# ---------------------------------------------------------------------------- GPU section


def _gpu_bench(fn, grad_to_none=None) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none, return_mode="median"))


def _gpu_peak_mib(fn) -> float:
    import torch

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def _liger_loss():
    """Liger's fused linear cross entropy with reduction="sum", or None when not installed."""
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except Exception:
        return None
    loss_fn = LigerFusedLinearCrossEntropyLoss(reduction="sum")

    def liger(hidden, weight, targets, with_entropy=False):
        out = loss_fn(weight, hidden, targets)
        loss = out[0] if isinstance(out, tuple) else out
        # The summed cross entropy is -sum(logprob): returned as a one-element "logprob" so the
        # harness can call backward on it like the others (the gradient flows the same way).
        return -loss.reshape(1), None

    return liger


def run_gpu_linear_logprob(
    shapes, dtype_name: str, impls: list[str], with_entropy: bool, device: str = "cuda"
) -> tuple[list[Timing], list[Timing]]:
    import torch

    from cir.kernels.linear_logprob import linear_logprob

    dtype = getattr(torch, DTYPES[dtype_name])
    compiled_naive = torch.compile(_naive_logprob, dynamic=False)
    liger = _liger_loss()
    fns = {
        "ours": lambda hd, wt, tg, ent: linear_logprob(hd, wt, tg, with_entropy=ent, impl="triton"),
        "naive": _naive_logprob,
        "chunked": lambda hd, wt, tg, ent: linear_logprob(hd, wt, tg, with_entropy=ent, impl="torch"),
        "compiled": compiled_naive,
        "liger": liger,
    }
    rows: list[Timing] = []
    roof: list[Timing] = []
    for i, (n, h, v) in enumerate(shapes):
        _progress(f"[gpu {i + 1}/{len(shapes)}] N={n} H={h} V={v} {dtype_name}")
        shape = _shape(n, h, v)
        gen = torch.Generator(device=device).manual_seed(i)
        hidden = (torch.randn(n, h, device=device, generator=gen) * 0.5).to(dtype)
        weight = (torch.randn(v, h, device=device, generator=gen) * 0.02).to(dtype)
        targets = torch.randint(0, v, (n,), device=device, generator=gen)

        # The roofline: the same FLOPs as plain matmuls (logits; dhidden = dZ W; dweight = dZ^T H).
        try:
            dz = torch.randn(n, v, device=device, dtype=dtype)
            t_fwd = _gpu_bench(lambda: hidden @ weight.T)
            t_dh = _gpu_bench(lambda: dz @ weight)
            t_dw = _gpu_bench(lambda: dz.T @ hidden)
            dz = None  # free it before the kernels run (the lambdas above are done with it)
            flops = 2.0 * n * h * v
            roof.append(Timing("roofline", "matmul", "fwd", shape, ms=t_fwd, extra={"tflops": flops / t_fwd / 1e9}))
            roof.append(
                Timing(
                    "roofline",
                    "matmul",
                    "fwd+bwd",
                    shape,
                    ms=t_fwd + t_dh + t_dw,
                    extra={"tflops": 3 * flops / (t_fwd + t_dh + t_dw) / 1e9},
                )
            )
        except torch.cuda.OutOfMemoryError:
            roof.append(Timing("roofline", "matmul", "fwd+bwd", shape, status="oom"))
        torch.cuda.empty_cache()
        roof_ms = {t.mode: t.ms for t in roof if t.shape == shape and t.status == "ok"}

        if "compiled" in impls:
            # A fresh Dynamo cache per shape: past its recompile limit Dynamo would silently
            # run the naive form eagerly for the later shapes.
            torch._dynamo.reset()
        for impl in impls:
            fn = fns[impl]
            if fn is None:
                for mode in ("fwd", "fwd+bwd"):
                    rows.append(
                        Timing("linear_logprob", impl, mode, shape, status="unavailable: liger_kernel not importable")
                    )
                continue
            if impl == "liger" and with_entropy:
                rows.append(Timing("linear_logprob", impl, "fwd+bwd", shape, status="unavailable: no entropy output"))
                continue
            for mode in ("fwd", "fwd+bwd"):
                timing = Timing("linear_logprob", impl, mode, shape)
                hd = hidden.detach().requires_grad_(mode == "fwd+bwd")
                wt = weight.detach().requires_grad_(mode == "fwd+bwd")

                def call(fn=fn, hd=hd, wt=wt, mode=mode):
                    if mode == "fwd":
                        with torch.no_grad():
                            fn(hd, wt, targets, with_entropy)
                    else:
                        _backward_of(fn(hd, wt, targets, with_entropy))

                try:
                    call()  # compile / autotune outside the timed region
                    hd.grad = wt.grad = None
                    timing.peak_mib = _gpu_peak_mib(call)
                    hd.grad = wt.grad = None
                    timing.ms = _gpu_bench(call, grad_to_none=[hd, wt] if mode == "fwd+bwd" else None)
                    useful = (2.0 if mode == "fwd" else 6.0) * n * h * v
                    timing.extra["tflops"] = useful / timing.ms / 1e9
                    if mode in roof_ms:
                        timing.extra["roofline_frac"] = roof_ms[mode] / timing.ms
                except torch.cuda.OutOfMemoryError:
                    timing.status = "oom"
                except Exception as exc:  # a baseline failing (e.g. compile) must not stop the run
                    timing.status = f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
                hd.grad = wt.grad = None
                torch.cuda.empty_cache()
                rows.append(timing)
                _progress(f"    {impl:9s} {mode:8s} {timing.status if timing.ms is None else f'{timing.ms:.3f} ms'}")
    return rows, roof


def _gpu_graph_bench(fn, grad_to_none=None) -> float:
    """Median ms per call replaying a CUDA graph of repeated calls: kernel time without host overhead."""
    from triton.testing import do_bench_cudagraph

    return float(do_bench_cudagraph(fn, rep=100, grad_to_none=grad_to_none, return_mode="median"))


def _policy_inputs(B: int, T: int, device: str, seed: int) -> dict:
    import torch

    gen = torch.Generator(device=device).manual_seed(seed)
    lp = -torch.rand(B, T, device=device, generator=gen) * 3
    return dict(
        logprob=lp,
        old_logprob=lp + torch.randn(B, T, device=device, generator=gen) * 0.1,
        advantages=torch.randn(B, T, device=device, generator=gen),
        loss_mask=torch.rand(B, T, device=device, generator=gen) > 0.3,
    )


def run_gpu_policy_loss(tokens: int, device: str = "cuda") -> tuple[list[Timing], Timing]:
    """policy_loss, ours vs the eager torch reference, on `tokens` tokens in [B, 4096] rows.

    Two timings per cell: `ms` as called from Python (do_bench: host overhead included, L2
    flushed before each call; what a trainer sees) and `graph_ms` replaying a CUDA graph of
    calls that rotate over enough input sets to overflow L2 (the kernels' own time; this is
    the figure to hold against the device-copy bandwidth).
    """
    import torch

    from cir.kernels.policy_loss import policy_loss

    # The yardstick: a device-to-device copy (read + write) of COPY_BYTES.
    src = torch.empty(COPY_BYTES // 4, device=device, dtype=torch.float32)
    dst = torch.empty_like(src)
    t_copy = _gpu_bench(lambda: dst.copy_(src))
    copy = Timing(
        "copy", "device-copy", "copy", {"bytes": COPY_BYTES}, ms=t_copy, extra={"gbps": 2 * COPY_BYTES / t_copy / 1e6}
    )
    src = dst = None  # free the 2 GiB before the kernels run

    seq_len = min(POLICY_SEQ_LEN, tokens)
    B = max(1, tokens // seq_len)
    n_tokens = B * seq_len
    # Minimal traffic: forward reads logprob, old, advantages (fp32) and the bool mask; the
    # backward reads them again and writes dlogprob.
    bytes_fwd = n_tokens * (4 + 4 + 4 + 1)
    bytes_fwd_bwd = bytes_fwd * 2 + n_tokens * 4
    l2 = torch.cuda.get_device_properties(device).L2_cache_size if device == "cuda" else 0
    n_sets = max(1, min(32, -(-4 * l2 // bytes_fwd_bwd)))  # rotate through >= 4x the L2 size
    sets = [_policy_inputs(B, seq_len, device, seed) for seed in range(n_sets)]
    rows = []
    shape = {
        "tokens": n_tokens,
        "B": B,
        "T": seq_len,
        "aggregation": "token-mean",
        "dual_clip": 3.0,
        "graph_input_sets": n_sets,
    }
    for impl, label in (("triton", "ours"), ("torch", "eager")):
        for mode, nbytes in (("fwd", bytes_fwd), ("fwd+bwd", bytes_fwd_bwd)):
            leaves = [s["logprob"].detach().requires_grad_(mode == "fwd+bwd") for s in sets]
            turn = [0]

            def call(impl=impl, mode=mode, leaves=leaves, turn=turn):
                k = turn[0] % len(sets)
                turn[0] += 1
                inputs = dict(sets[k], logprob=leaves[k])
                if mode == "fwd":
                    with torch.no_grad():
                        policy_loss(**inputs, impl=impl)
                else:
                    policy_loss(**inputs, impl=impl)[0].backward()

            grads = leaves if mode == "fwd+bwd" else None
            call()
            for x in leaves:
                x.grad = None
            peak = _gpu_peak_mib(call)
            ms = _gpu_bench(call, grad_to_none=grads)
            gbps = nbytes / ms / 1e6
            extra = {"bytes": nbytes, "gbps": gbps, "copy_frac": gbps / copy.extra["gbps"]}
            try:
                graph_ms = _gpu_graph_bench(call, grad_to_none=grads)
                graph_gbps = nbytes / graph_ms / 1e6
                extra.update(graph_ms=graph_ms, graph_gbps=graph_gbps, graph_copy_frac=graph_gbps / copy.extra["gbps"])
            except Exception as exc:  # capture can fail on an odd setup; the plain timing stands
                extra["graph_status"] = f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
            rows.append(Timing("policy_loss", label, mode, shape, ms=ms, peak_mib=peak, extra=extra))
            _progress(f"    policy_loss {label:5s} {mode:8s} {ms:.4f} ms  graph {extra.get('graph_ms')}")
    other = {(t.mode, "ms"): t.ms for t in rows if t.impl == "eager"}
    other.update({(t.mode, "graph_ms"): t.extra.get("graph_ms") for t in rows if t.impl == "eager"})
    for t in rows:
        if t.impl == "ours":
            t.extra["speedup_vs_eager"] = other[(t.mode, "ms")] / t.ms
            eager_graph, ours_graph = other[(t.mode, "graph_ms")], t.extra.get("graph_ms")
            t.extra["graph_speedup_vs_eager"] = eager_graph / ours_graph if eager_graph and ours_graph else None
    return rows, copy


# ---------------------------------------------------------------------------- output


def _print_report(report: dict) -> None:
    print(f"device: {report['device']}")
    if report["checks"]:
        print("\ncorrectness spot checks (max errors against float64 references)")
        rows = [
            {
                "check": c["name"],
                "shape": " ".join(f"{k}={v}" for k, v in c["shape"].items()),
                "max_rel_err": c["max_rel_err"],
                "tol": c["tolerance"],
                "ok": "ok" if c["ok"] else "FAIL",
            }
            for c in report["checks"]
        ]
        print(
            _format_table(
                rows,
                [
                    ("check", "check"),
                    ("shape", "shape"),
                    ("max_rel_err", "max rel err"),
                    ("tol", "tolerance"),
                    ("ok", "result"),
                ],
            )
        )
        for c in report["checks"]:
            errs = ", ".join(f"{k} {v:.2e}" for k, v in c["max_abs_err"].items())
            print(f"  {c['name']}: max abs err {errs}")

    def lin_rows(section_rows):
        out = []
        for t in section_rows:
            s = t["shape"]
            out.append(
                {
                    "shape": f"{s['N']}x{s['H']}x{s['V']}",
                    "impl": t["impl"],
                    "mode": t["mode"],
                    "ms": t["ms"],
                    "peak_mib": t["peak_mib"],
                    "tflops": t["extra"].get("tflops"),
                    "roof": t["extra"].get("roofline_frac"),
                    "status": t["status"],
                }
            )
        return out

    gpu = report.get("gpu")
    if gpu:
        print(f"\nlinear_logprob (N x H x V; fwd = no-grad forward, fwd+bwd = training step; {gpu['matmul_path']})")
        print(
            _format_table(
                lin_rows(gpu["linear_logprob"]),
                [
                    ("shape", "N x H x V"),
                    ("impl", "impl"),
                    ("mode", "mode"),
                    ("ms", "ms"),
                    ("peak_mib", "peak MiB"),
                    ("tflops", "TFLOP/s"),
                    ("roof", "of roofline"),
                    ("status", "status"),
                ],
            )
        )
        print(f"\nmatmul roofline (plain {gpu['dtype']} matmuls of the same shapes: logits, dhidden, dweight)")
        print(
            _format_table(
                lin_rows(gpu["roofline"]),
                [("shape", "N x H x V"), ("mode", "mode"), ("ms", "ms"), ("tflops", "TFLOP/s"), ("status", "status")],
            )
        )
        print(
            f"\npolicy_loss ({gpu['policy_loss'][0]['shape']['tokens']} tokens; device copy "
            f"{gpu['copy']['extra']['gbps']:.0f} GB/s)"
        )
        rows = [
            {
                "impl": t["impl"],
                "mode": t["mode"],
                "ms": t["ms"],
                "peak_mib": t["peak_mib"],
                "gbps": t["extra"]["gbps"],
                "speedup": t["extra"].get("speedup_vs_eager"),
                "graph_ms": t["extra"].get("graph_ms"),
                "graph_gbps": t["extra"].get("graph_gbps"),
                "graph_frac": t["extra"].get("graph_copy_frac"),
                "graph_speedup": t["extra"].get("graph_speedup_vs_eager"),
            }
            for t in gpu["policy_loss"]
        ]
        print(
            "  ms: called from Python (host overhead included); graph: CUDA-graph replay, rotating inputs (kernel time)"
        )
        print(
            _format_table(
                rows,
                [
                    ("impl", "impl"),
                    ("mode", "mode"),
                    ("ms", "ms"),
                    ("gbps", "GB/s"),
                    ("speedup", "x eager"),
                    ("graph_ms", "graph ms"),
                    ("graph_gbps", "graph GB/s"),
                    ("graph_frac", "of copy"),
                    ("graph_speedup", "graph x eager"),
                    ("peak_mib", "peak MiB"),
                ],
            )
        )
        for t in gpu["policy_loss"]:
            if "graph_status" in t["extra"]:
                print(f"  {t['impl']} {t['mode']}: CUDA graph timing failed: {t['extra']['graph_status']}")
    cpu = report.get("cpu")
    if cpu:
        print(
            f"\nCPU: chunked fallback vs naive torch (fp32, {cpu['threads']} threads; peak = peak RSS growth; "
            "machine may be shared)"
        )
        print(
            _format_table(
                lin_rows(cpu["linear_logprob"]),
                [("shape", "N x H x V"), ("impl", "impl"), ("mode", "mode"), ("ms", "ms"), ("peak_mib", "peak MiB")],
            )
        )


def _plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gpu, cpu = report.get("gpu"), report.get("cpu")
    rows = (gpu or cpu)["linear_logprob"]
    shapes = []
    for t in rows:
        key = f"{t['shape']['N']}x{t['shape']['H']}x{t['shape']['V']}"
        if key not in shapes:
            shapes.append(key)
    impls = [i for i in IMPLS if any(t["impl"] == i for t in rows)]
    panels = [("fwd+bwd", "ms", "fwd+bwd time (ms)"), ("fwd+bwd", "peak_mib", "fwd+bwd peak extra memory (MiB)")]
    if gpu:
        panels.append(("fwd+bwd", "roofline_frac", "fwd+bwd fraction of the matmul roofline"))
    ncols = len(panels) + 1
    fig, axes = plt.subplots(1, ncols, figsize=(6 * ncols, 4.5))
    width = 0.8 / max(1, len(impls))
    for ax, (mode, key, title) in zip(axes, panels):
        for j, impl in enumerate(impls):
            vals = []
            for s in shapes:
                match = [
                    t
                    for t in rows
                    if t["impl"] == impl
                    and t["mode"] == mode
                    and f"{t['shape']['N']}x{t['shape']['H']}x{t['shape']['V']}" == s
                ]
                value = (match[0].get(key, match[0]["extra"].get(key))) if match else None
                vals.append(value if value is not None else 0.0)
            ax.bar([i + j * width for i in range(len(shapes))], vals, width, label=impl)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(shapes))], shapes, rotation=45, ha="right", fontsize=7)
        ax.set_title(("GPU " if gpu else "CPU ") + "linear_logprob: " + title, fontsize=9)
        if key != "roofline_frac":
            ax.set_yscale("log")
        ax.legend(fontsize=7)
    last = axes[-1]
    if gpu:
        pl_rows = gpu["policy_loss"]
        xs = range(len(pl_rows))
        last.bar([x - 0.2 for x in xs], [t["ms"] for t in pl_rows], 0.4, label="called from Python")
        last.bar(
            [x + 0.2 for x in xs],
            [t["extra"].get("graph_ms") or 0.0 for t in pl_rows],
            0.4,
            label="CUDA graph (kernel time)",
        )
        last.set_xticks(list(xs), [f"{t['impl']}\n{t['mode']}" for t in pl_rows], fontsize=8)
        last.set_yscale("log")
        last.legend(fontsize=7)
        last.set_title(f"policy_loss, {pl_rows[0]['shape']['tokens']} tokens (ms)", fontsize=9)
    else:
        checks = report["checks"]
        names = [
            c["name"].replace(" vs float64 reference", "").replace(" (interpreter)", "\n(interpreter)") for c in checks
        ]
        last.barh(
            names, [max(c["max_rel_err"], 1e-18) for c in checks], color=["C2" if c["ok"] else "C3" for c in checks]
        )
        last.axvline(1e-4, color="k", linestyle="--", linewidth=1, label="tolerance")
        last.set_xscale("log")
        last.tick_params(axis="y", labelsize=6)
        last.set_title("correctness: max rel err vs float64", fontsize=9)
        last.legend(fontsize=7)
    fig.suptitle(f"cir bench kernels on {report['device']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------- entry point


def run(args: argparse.Namespace) -> int:
    import torch

    cuda = torch.cuda.is_available()
    if not cuda:
        # Triton decides at import whether kernels run through its interpreter; no kernel
        # module may have been imported before this line for the CPU checks to run.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    try:
        from importlib.metadata import version

        import liger_kernel  # noqa: F401

        liger_version = version("liger-kernel")
    except Exception:
        liger_version = None

    shapes = _parse_shapes(args.shapes)
    device_name = torch.cuda.get_device_name() if cuda else "cpu"
    report: dict = {
        "device": device_name,
        "cuda": cuda,
        "quick": bool(args.quick),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "triton": triton_version,
            "liger_kernel": liger_version,
        },
        "gpu_measurements": "ran" if cuda else "not run: the GPU timings, roofline and bandwidth figures need CUDA",
    }

    _progress("correctness spot checks ...")
    checks = run_checks("cuda" if cuda else "cpu", quick=args.quick)
    report["checks"] = [asdict(c) for c in checks]
    report["checks_ran"] = [c.name for c in checks]
    if not any(c.name.startswith("policy_loss") for c in checks):
        report["checks_skipped"] = ["Triton kernels: neither CUDA nor Triton's interpreter available"]

    if cuda:
        if shapes is None:
            shapes = (
                list(QUICK_GPU_SHAPES)
                if args.quick
                else [(n, h, v) for n in DEFAULT_N for h in DEFAULT_H for v in DEFAULT_V]
            )
        tokens = args.policy_tokens or (QUICK_POLICY_TOKENS if args.quick else POLICY_TOKENS)
        lin, roof = run_gpu_linear_logprob(shapes, args.dtype, args.impls, args.with_entropy)
        pl_rows, copy = run_gpu_policy_loss(tokens)
        report["gpu"] = {
            "dtype": args.dtype,
            "matmul_path": matmul_path(args.dtype),
            "with_entropy": bool(args.with_entropy),
            "linear_logprob": [asdict(t) for t in lin],
            "roofline": [asdict(t) for t in roof],
            "policy_loss": [asdict(t) for t in pl_rows],
            "copy": asdict(copy),
        }
    else:
        print(
            "No CUDA device: the GPU measurements (timings against Liger and torch.compile, TFLOP/s "
            "against the matmul roofline, GB/s against a device copy) need CUDA and were NOT run. "
            "Running the CPU section: correctness spot checks through Triton's interpreter, and the "
            "chunked fallback against naive torch.\n"
        )
        cpu_shapes = shapes or list(QUICK_CPU_SHAPES if args.quick else CPU_SHAPES)
        report["cpu"] = {
            "threads": torch.get_num_threads(),
            "peak_memory": "peak RSS growth during one call (/proc/self VmHWM after a reset)",
            "linear_logprob": [asdict(t) for t in run_cpu_timings(cpu_shapes, args.quick)],
        }

    _print_report(report)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
        print(f"\nwrote {args.json}")
    if args.plot:
        os.makedirs(os.path.dirname(os.path.abspath(args.plot)), exist_ok=True)
        _plot(report, args.plot)
        print(f"wrote {args.plot}")
    failed = [c.name for c in checks if not c.ok]
    if failed:
        print(f"\nFAILED correctness checks: {failed}", file=sys.stderr)
        return 1
    return 0
