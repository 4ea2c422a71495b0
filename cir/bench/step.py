"""`cir bench step`: one RL update of a model built from a config, beside its prediction and floor.

It builds a model from a `transformers` config with random weights and the config's real
vocabulary (a named size, a JSON file or a Hugging Face folder's config.json), a batch of the
given shape (prompts x samples, prompt and response tokens: random tokens, or with `--rollout`
sampled by the `transformers` engine from random prompts), and runs the actor's update on it as
the trainer does (`cir.training.actor.Actor`: on CUDA the FSDP2 actor at world size 1, bf16
compute and fp32 master weights; `--sharded` shards on a CPU too). After warm-up steps it reports, for the
timed steps:

- time per step and tokens per second; with `--rollout`, generation and the weight hand-off too;
- peak memory: on CUDA `torch.cuda.max_memory_allocated` over the step; on a CPU the growth of
  the peak resident set over the resident set before the step (large frees are returned to the
  OS, so it follows the live tensors);
- each phase's share of the update: old/ref log-probs (no-grad forwards), forward, the loss
  (from the policy's output to the start of its backward), backward, optimizer step, and the
  rest (metrics, zero_grad, clipping);
- the same figures as `cir bench estimate`'s model predicts them (its `estimate`, with this
  device: a datasheet GPU, or the device's own memory and the matmul rate measured here);
- the step's matmul floor: the model's and the LM head's FLOPs (`ModelShape.forward_flops`,
  forward and backward) at this device's matmul rate, measured in the same run on GEMMs of the
  step's shapes in the step's compute dtype, and the update's time over it.

Timings are the best of the timed steps (and of the GEMM repeats), so that a machine shared with
other work shows its least disturbed figure; the median is reported beside it. The phase clock
synchronises the device at each boundary on CUDA (a little slower, but each phase is its own).
`--clock cpu` times with the process's CPU time instead of the wall clock (all threads summed):
on a CPU shared with other jobs, where this process gets a fraction of a core, wall time
measures the neighbours; with `--threads 1` CPU time measures the work itself, and the floor's
GEMMs are timed with the same clock.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

QWEN_VOCAB = 151936

# Named model shapes, all Qwen2 with the Qwen vocabulary and tied embeddings.
MODEL_SIZES: dict[str, dict] = {
    # CI's size: 2 layers x 64 wide (10M parameters, nearly all of them the embedding).
    "tiny": dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
    ),
    # The TRL comparison's model: 39.8M parameters, 38.9M of them the 151,936 x 256 embedding.
    "40m": dict(
        hidden_size=256, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4
    ),
    # Qwen2.5-0.5B's shape (its config.json), 494M parameters.
    "0.5b": dict(
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        max_position_embeddings=32768,
        rope_theta=1000000.0,
    ),
}


def model_config(spec: str):
    """A `transformers` config from a named size, a JSON file or a model folder (no download)."""
    from transformers import AutoConfig, Qwen2Config

    if spec in MODEL_SIZES:
        return Qwen2Config(vocab_size=QWEN_VOCAB, tie_word_embeddings=True, **MODEL_SIZES[spec])
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"--model {spec}: {path} has no config.json")
        return AutoConfig.from_pretrained(path, local_files_only=True)
    if path.is_file():
        try:
            values = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"--model {spec}: not valid JSON ({e})") from None
        if not isinstance(values, dict):
            raise ValueError(f"--model {spec}: the JSON must be an object (a config.json)")
        return AutoConfig.for_model(values.pop("model_type", "qwen2"), **values)
    raise ValueError(f"--model {spec!r}: neither a size ({', '.join(MODEL_SIZES)}) nor a JSON file or model folder")


# ---------------------------------------------------------------------------------------- batch


def random_trajectories(prompts: int, samples: int, prompt_tokens: int, response_tokens: int, vocab: int, seed: int):
    """prompts x samples trajectories of random tokens, every response token the model's own."""
    import torch

    from cir.trajectory import Trajectory

    gen = torch.Generator().manual_seed(seed)
    out = []
    for p in range(prompts):
        prompt = torch.randint(0, vocab, (prompt_tokens,), generator=gen).tolist()
        for _ in range(samples):
            response = torch.randint(0, vocab, (response_tokens,), generator=gen).tolist()
            logprobs = (-torch.rand(response_tokens, generator=gen) * 10).tolist()
            traj = Trajectory(prompt_ids=list(prompt), group=p)
            traj.append(response, logprobs, trainable=True)
            out.append(traj)
    return out


def group_advantages(num: int, seed: int):
    """Advantages centred per group of rewards (+1 / -1 at random), as a group baseline gives."""
    import torch

    gen = torch.Generator().manual_seed(seed + 1)
    return torch.randn(num, generator=gen)


# ---------------------------------------------------------------------------------------- clocks


def clock_of(name: str):
    """The timer: "wall" (time.perf_counter) or "cpu" (this process's CPU time, every thread)."""
    return time.process_time if name == "cpu" else time.perf_counter


class PhaseClock:
    """Times the phases of `actor.update` from hooks on the policy module and the optimizer, so
    the actor's code is used as it is. On CUDA every boundary synchronises the device."""

    PHASES = ("old/ref log-probs", "forward", "loss", "backward", "optimizer")

    def __init__(self, policy, optimizer, cuda: bool, clock=time.perf_counter):
        import torch

        self._torch = torch
        self._clock = clock
        self.cuda = cuda
        self.seconds = dict.fromkeys(self.PHASES, 0.0)
        self._forward_start = 0.0
        self._forward_end = 0.0
        self._backward_start = 0.0
        self._step_start = 0.0
        self.enabled = False
        self._handles = [
            policy.register_forward_pre_hook(self._before_forward),
            policy.register_forward_hook(self._after_forward),
            optimizer.register_step_pre_hook(self._before_step),
            optimizer.register_step_post_hook(self._after_step),
        ]

    def reset(self) -> None:
        self.seconds = dict.fromkeys(self.PHASES, 0.0)

    def _now(self) -> float:
        if self.cuda:
            self._torch.cuda.synchronize()
        return self._clock()

    def _before_forward(self, module, args):
        if self.enabled:
            self._forward_start = self._now()

    def _after_forward(self, module, args, output):
        if not self.enabled:
            return
        self._forward_end = self._now()
        grad = self._torch.is_grad_enabled()
        phase = "forward" if grad else "old/ref log-probs"
        self.seconds[phase] += self._forward_end - self._forward_start
        logprob = output[0]
        if grad and logprob.requires_grad:
            logprob.register_hook(self._backward_reached)

    def _backward_reached(self, grad):
        # The loss's own backward is done; the model's starts. Its end: a callback the autograd
        # engine runs once the whole backward pass has finished.
        self._backward_start = self._now()
        self.seconds["loss"] += self._backward_start - self._forward_end
        self._torch.autograd.Variable._execution_engine.queue_callback(self._backward_done)
        return None

    def _backward_done(self):
        self.seconds["backward"] += self._now() - self._backward_start

    def _before_step(self, optimizer, args, kwargs):
        if self.enabled:
            self._step_start = self._now()

    def _after_step(self, optimizer, args, kwargs):
        if self.enabled:
            self.seconds["optimizer"] += self._now() - self._step_start

    def close(self) -> None:
        for h in self._handles:
            h.remove()


def _sync(cuda: bool) -> None:
    if cuda:
        import torch

        torch.cuda.synchronize()


def _best_seconds(fn, repeats: int, cuda: bool, clock=time.perf_counter) -> float:
    fn()
    best = math.inf
    for _ in range(repeats):
        _sync(cuda)
        t0 = clock()
        fn()
        _sync(cuda)
        best = min(best, clock() - t0)
    return best


@dataclass
class MatmulRate:
    """The matmul rate measured on GEMMs of the step's shapes (best of the repeats)."""

    dtype: str
    gemms: list[dict] = field(default_factory=list)  # shape, seconds, TFLOP/s of each

    def rate(self, kind: str) -> float:
        """The best FLOP/s among the GEMMs of `kind` ("lm_head" or "decoder")."""
        return max(g["tflops"] for g in self.gemms if g["kind"] == kind) * 1e12


def measure_matmul(
    shape, *, head_rows: int, tokens: int, dtype, device, repeats: int = 3, clock=time.perf_counter
) -> MatmulRate:
    """GEMMs of the step's shapes in its compute dtype: the LM head's [rows, H] x [H, V] (over
    vocabulary blocks of several widths: the fastest is the rate, so no block choice flatters the
    floor) and the decoder's widest projection [tokens, H] x [H, I]."""
    import torch

    cuda = torch.device(device).type == "cuda"
    gen = torch.Generator(device=device).manual_seed(0)
    h = shape.hidden_size
    result = MatmulRate(str(dtype).removeprefix("torch."))
    a = torch.randn(head_rows, h, device=device, generator=gen).to(dtype)
    widths = sorted({min(shape.vocab_size, w) for w in (512, 4096, 32768) if w * head_rows <= 1 << 28})
    for width in widths or [min(shape.vocab_size, 512)]:
        b = torch.randn(width, h, device=device, generator=gen).to(dtype)
        out = torch.empty(head_rows, width, device=device, dtype=dtype)
        seconds = _best_seconds(lambda b=b, out=out: torch.mm(a, b.T, out=out), repeats, cuda, clock)
        flops = 2.0 * head_rows * h * width
        result.gemms.append(
            dict(kind="lm_head", m=head_rows, k=h, n=width, seconds=seconds, tflops=flops / seconds / 1e12)
        )
        del b, out
    x = torch.randn(tokens, h, device=device, generator=gen).to(dtype)
    w = torch.randn(shape.intermediate_size, h, device=device, generator=gen).to(dtype)
    out = torch.empty(tokens, shape.intermediate_size, device=device, dtype=dtype)
    seconds = _best_seconds(lambda: torch.mm(x, w.T, out=out), repeats, cuda, clock)
    flops = 2.0 * tokens * h * shape.intermediate_size
    result.gemms.append(
        dict(kind="decoder", m=tokens, k=h, n=shape.intermediate_size, seconds=seconds, tflops=flops / seconds / 1e12)
    )
    return result


def measure_copy_bytes_per_s(device, nbytes: int, clock=time.perf_counter) -> float:
    """Bytes moved per second (read + write) by a device-to-device copy of `nbytes`."""
    import torch

    cuda = torch.device(device).type == "cuda"
    src = torch.empty(nbytes // 4, device=device, dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    return 2 * nbytes / _best_seconds(lambda: dst.copy_(src), 3, cuda, clock)


# ---------------------------------------------------------------------------------------- memory


class PeakMemory:
    """Peak memory over a region: CUDA's max_memory_allocated, or on a CPU the peak resident set's
    growth over the resident set at the start (Linux /proc; None elsewhere)."""

    def __init__(self, cuda: bool):
        from cir.bench.kernels import _release_large_frees_to_os

        self.cuda = cuda
        self.exact_rss = cuda or _release_large_frees_to_os()
        self._base = None

    def start(self) -> None:
        import torch

        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return
        from cir.bench.kernels import _reset_peak_rss, _rss_mib

        self._base = _rss_mib("VmRSS") if _reset_peak_rss() else None

    def peak_bytes(self) -> float | None:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            return float(torch.cuda.max_memory_allocated())
        from cir.bench.kernels import _rss_mib

        hwm = _rss_mib("VmHWM")
        if self._base is None or hwm is None:
            return None
        return max(0.0, hwm - self._base) * 2**20


# ---------------------------------------------------------------------------------------- the run


def _device_gpu(device, measured_tflops: float, copy_bytes_per_s: float, gpu_name: str | None):
    """The estimator's GPU record for this device: a datasheet entry when named or recognised,
    else this device's own memory with the rate and bandwidth measured here."""
    import torch

    from cir.bench.estimate import GPU, GPUS

    if gpu_name is not None:
        return GPUS[gpu_name]
    if torch.device(device).type == "cuda":
        props = torch.cuda.get_device_properties(torch.device(device))
        for key, gpu in GPUS.items():
            if key in props.name.lower():
                return gpu
        return GPU(props.name + " (measured)", props.total_memory, copy_bytes_per_s / 2e12, measured_tflops / 1e12)
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return GPU("this CPU (measured)", memory, copy_bytes_per_s / 2e12, measured_tflops / 1e12)


def run_step_bench(args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from cir.algorithms import AlgoConfig
    from cir.bench.estimate import Assumptions, ModelShape, causal_pairs, estimate
    from cir.distributed import DistributedContext
    from cir.training.actor import Actor, sync_weights
    from cir.training.batch import build_train_batch
    from cir.training.optim import OptimConfig

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    clock = clock_of(args.clock)
    if cuda and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    config = model_config(args.model)
    shape = ModelShape.from_hf_config(config.to_dict())
    param_dtype = getattr(torch, args.dtype)
    num = args.prompts * args.samples

    torch.manual_seed(args.seed)
    config._attn_implementation = "sdpa"
    model = AutoModelForCausalLM.from_config(config, dtype=param_dtype, attn_implementation="sdpa").eval()
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    params = sum(p.numel() for p in model.parameters())

    engine = None
    engine_dtype = None
    if args.rollout:
        from cir.engines.factory import engine_dtype as resolve_engine_dtype
        from cir.engines.factory import make_engine

        policy_dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        engine_dtype = getattr(torch, resolve_engine_dtype(args.engine_dtype, device.type, policy_dtype))
        # As the trainer does: the engine takes its copy while the policy is still on the CPU.
        engine = make_engine("hf", model, None, max_batch_size=num, seed=args.seed, device=device, dtype=engine_dtype)

    optim = OptimConfig(
        lr=1e-6, ppo_epochs=args.ppo_epochs, mini_batches=args.mini_batches, micro_batch_tokens=args.micro_batch_tokens
    )
    algo = AlgoConfig(
        group_size=args.samples,
        prompts_per_step=args.prompts,
        kl_coef=0.01 if args.kl else 0.0,
        logprob_impl=args.logprob_impl,
        fused_loss=args.fused_loss,
    )
    total_steps = (args.warmup + args.steps) * args.ppo_epochs * args.mini_batches
    if cuda:
        torch.cuda.set_device(device)
    model.to(device)
    # The trainer's actor as one process builds it: sharded (FSDP2 over a group of one, bf16
    # compute, fp32 master weights) on CUDA, the plain module on a CPU unless --sharded.
    actor = Actor(
        model,
        None,
        optim,
        algo,
        total_optimizer_steps=total_steps,
        dist=DistributedContext(),
        shard=True if args.sharded else None,
    )
    # What the update's matmuls run in, as the actor decided it.
    compute_dtype = actor.compute_dtype
    sharded = actor.sharded

    def batch_of(trajectories):
        return build_train_batch(
            trajectories,
            group_advantages(len(trajectories), args.seed),
            pad_id=0,
            device=device,
            mini_batches=args.mini_batches,
            micro_batch_tokens=args.micro_batch_tokens,
            temperature=1.0,
            max_response_tokens=args.response_tokens,
        )

    def rollout(step: int):
        from cir.engines.base import SamplingParams

        gen = torch.Generator().manual_seed(args.seed + 1000 * step)
        prompts = [
            torch.randint(0, shape.vocab_size, (args.prompt_tokens,), generator=gen).tolist()
            for _ in range(args.prompts)
        ]
        params = [
            SamplingParams(max_new_tokens=args.response_tokens, temperature=1.0, seed=args.seed + 7919 * i + step)
            for i in range(num)
        ]
        flat = [p for p in prompts for _ in range(args.samples)]
        _sync(cuda)
        t0 = clock()
        completions = engine.generate_batch(flat, params)
        _sync(cuda)
        seconds = clock() - t0
        from cir.trajectory import Trajectory

        trajectories = []
        for i, (prompt, c) in enumerate(zip(flat, completions)):
            traj = Trajectory(prompt_ids=list(prompt), group=i // args.samples)
            traj.append(list(c.token_ids), list(c.logprobs), trainable=True)
            trajectories.append(traj)
        return trajectories, seconds, sum(len(c.token_ids) for c in completions)

    fixed = None
    if engine is None:
        fixed = batch_of(
            random_trajectories(
                args.prompts, args.samples, args.prompt_tokens, args.response_tokens, shape.vocab_size, args.seed
            )
        )

    phase_clock = PhaseClock(actor.policy, actor.optimizer, cuda, clock)
    memory = PeakMemory(cuda)
    records = []
    for step in range(args.warmup + args.steps):
        timed = step >= args.warmup
        record: dict = {}
        if engine is not None:
            trajectories, gen_s, gen_tokens = rollout(step)
            batch = batch_of(trajectories)
            record |= {"rollout_s": gen_s, "generated_tokens": gen_tokens}
        else:
            batch = fixed
            # Every step computes its old log-probs afresh (the actor fills them in).
            for mb in batch.micro_batches:
                mb.old_logprobs = mb.ref_logprobs = None
        phase_clock.reset()
        phase_clock.enabled = timed
        memory.start()
        _sync(cuda)
        t0 = clock()
        metrics = actor.update(batch)
        _sync(cuda)
        record["update_s"] = clock() - t0
        record["peak_bytes"] = memory.peak_bytes()
        phase_clock.enabled = False
        record["phases_s"] = dict(phase_clock.seconds)
        if engine is not None:
            _sync(cuda)
            t0 = clock()
            sync_weights(actor, engine)
            _sync(cuda)
            record["handoff_s"] = clock() - t0
        record["loss"] = metrics.get("actor/loss")
        record["grad_norm"] = metrics.get("actor/grad_norm")
        if timed:
            records.append(record)
        print(f"[cir bench step] step {step + 1}/{args.warmup + args.steps}: update {record['update_s']:.3f}s"
              + ("" if timed else " (warm-up)"), file=sys.stderr, flush=True)  # fmt: skip
    phase_clock.close()

    micro = batch.micro_batches
    head_rows = max(int(mb.targets.numel()) for mb in micro)
    slots = max(mb.num_input_slots for mb in micro)
    train_tokens = sum(
        int(mb.attention_mask.sum()) if mb.attention_mask is not None else mb.num_input_slots for mb in micro
    )
    response_tokens = sum(int(mb.targets.numel()) for mb in micro)
    seq = args.prompt_tokens + args.response_tokens
    pairs = num * causal_pairs(seq)

    rate = measure_matmul(shape, head_rows=head_rows, tokens=slots, dtype=compute_dtype, device=device, clock=clock)
    copy_rate = measure_copy_bytes_per_s(device, (1 << 30) if cuda else (1 << 28), clock)
    # The floor: forward + backward (3 forward passes) of the model's and the LM head's matmuls.
    head_flops = shape.forward_flops(0, response_tokens, 0)
    decoder_flops = shape.forward_flops(train_tokens, 0, pairs)
    floor_s = 3 * (head_flops / rate.rate("lm_head") + decoder_flops / rate.rate("decoder"))
    floor_rate = 3 * (head_flops + decoder_flops) / floor_s

    gpu = _device_gpu(device, floor_rate, copy_rate, args.gpu)
    est = estimate(
        shape,
        gpus=1,
        gpu=gpu,
        prompts_per_step=args.prompts,
        group_size=args.samples,
        max_response_tokens=args.response_tokens,
        micro_batch_tokens=slots,
        gradient_checkpointing=args.gradient_checkpointing,
        param_dtype=args.dtype,
        engine_dtype=str(engine_dtype).removeprefix("torch.") if engine_dtype is not None else "auto",
        ppo_epochs=args.ppo_epochs,
        mini_batches=args.mini_batches,
        kl_reference=args.kl,
        sharded=sharded,
        assumptions=Assumptions(
            prompt_tokens=args.prompt_tokens, mean_response_tokens=args.response_tokens, mfu=args.mfu
        ),
    )
    update_times = [r["update_s"] for r in records]
    best = min(update_times)
    best_record = records[update_times.index(best)]
    phase_total = sum(best_record["phases_s"].values())
    phases = dict(best_record["phases_s"])
    phases["other"] = max(0.0, best - phase_total)
    passes = est.update_passes
    pass_total = sum(passes.values())
    peak = [r["peak_bytes"] for r in records if r["peak_bytes"] is not None]
    if cuda:
        predicted_peak = est.update_allocated + (est.engine_weights if engine is not None else 0.0)
        peak_basis = "max_memory_allocated over the update (model, optimizer state, gradients, activations)"
        peak_prediction_basis = "resident + gathered + unsharded grads + activations (+ engine weights)"
    else:
        # The CPU figure is a growth over the resident state; the estimator's comparable term is
        # the activations (the gradients are freed by zero_grad and allocated again, net nothing;
        # the optimizer's and a tied LM head's gradient temporaries are not in its model).
        predicted_peak = est.activations
        peak_basis = "peak RSS growth over the update (what the update allocates beyond the resident state)"
        peak_prediction_basis = "activations of the largest micro-batch (temporaries not modelled)"
    report = {
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "model": {
            "spec": args.model,
            "parameters": params,
            "hidden_size": shape.hidden_size,
            "intermediate_size": shape.intermediate_size,
            "layers": shape.num_layers,
            "vocab_size": shape.vocab_size,
            "tied_embeddings": shape.tie_word_embeddings,
        },
        "batch": {
            "prompts": args.prompts,
            "samples": args.samples,
            "prompt_tokens": args.prompt_tokens,
            "response_tokens": args.response_tokens,
            "trained_tokens": train_tokens,
            "response_tokens_total": response_tokens,
            "micro_batches": len(micro),
            "largest_micro_batch_slots": slots,
        },
        "settings": {
            "param_dtype": args.dtype,
            "compute_dtype": str(compute_dtype).removeprefix("torch."),
            "sharded": bool(sharded),
            "gradient_checkpointing": bool(args.gradient_checkpointing),
            "logprob_impl": args.logprob_impl,
            "fused_loss": args.fused_loss,
            "fused_loss_used": bool(actor.fused_loss),
            "ppo_epochs": args.ppo_epochs,
            "mini_batches": args.mini_batches,
            "kl_reference": bool(args.kl),
            "rollout": bool(args.rollout),
            "engine_dtype": None if engine_dtype is None else str(engine_dtype).removeprefix("torch."),
            "warmup_steps": args.warmup,
            "clock": args.clock,
            "timed_steps": args.steps,
        },
        "measured": {
            "update_s_best": best,
            "update_s_median": statistics.median(update_times),
            "update_s_all": update_times,
            "tokens_per_s": train_tokens / best,
            "peak_bytes": max(peak) if peak else None,
            "peak_basis": peak_basis,
            "phases_s": phases,
            "phase_shares": {k: v / best for k, v in phases.items()},
            "loss": best_record["loss"],
            "grad_norm": best_record["grad_norm"],
        },
        "floor": {
            "matmul": {"dtype": rate.dtype, "gemms": rate.gemms},
            "lm_head_flops": 3 * head_flops,
            "decoder_flops": 3 * decoder_flops,
            "rate_tflops": floor_rate / 1e12,
            "seconds": floor_s,
            "update_over_floor": best / floor_s,
        },
        "copy_gb_per_s": copy_rate / 1e9,
        "predicted": {
            "gpu": gpu.name,
            "mfu": args.mfu,
            "update_s": est.update_s,
            "tokens_per_s": train_tokens / est.update_s,
            "train_flops": est.train_flops,
            "peak_bytes": predicted_peak,
            "peak_basis": peak_prediction_basis,
            "activations_bytes": est.activations,
            "update_allocated_bytes": est.update_allocated,
            "phase_shares": {k: v / pass_total for k, v in passes.items()},
            "notes": est.notes,
        },
    }
    if engine is not None:
        rollout_best = min(r["rollout_s"] for r in records)
        report["measured"]["rollout_s_best"] = rollout_best
        report["measured"]["generated_tokens_per_s"] = records[0]["generated_tokens"] / rollout_best
        report["measured"]["handoff_s_best"] = min(r["handoff_s"] for r in records)
        report["predicted"]["generation_s"] = est.generation_s
        engine.close()
    if cuda and report["measured"]["peak_bytes"] is not None:
        # The target the device check holds this to: within 15% of the estimate.
        report["peak_over_prediction"] = report["measured"]["peak_bytes"] / predicted_peak
    return report


# ---------------------------------------------------------------------------------------- output


def format_report(r: dict) -> str:
    m, p, f = r["measured"], r["predicted"], r["floor"]
    mib = lambda b: "-" if b is None else f"{b / 2**20:,.0f} MiB"  # noqa: E731
    pct = lambda x: f"{100 * x:.0f}%"  # noqa: E731
    s, b = r["settings"], r["batch"]
    lines = [
        f"cir bench step on {r['device']} ({r['threads']} threads, {s['clock']} clock): {r['model']['spec']} "
        f"({r['model']['parameters'] / 1e6:.1f}M parameters, vocabulary {r['model']['vocab_size']:,}), "
        f"{b['prompts']} prompts x {b['samples']} samples x {b['response_tokens']} response tokens "
        f"(prompt {b['prompt_tokens']}), {s['param_dtype']} weights, {s['compute_dtype']} compute"
        + (", FSDP2 (1 rank)" if s["sharded"] else "")
        + f", log-probs impl={s['logprob_impl']}"
        + (", LM head and loss fused" if s["fused_loss_used"] else ", LM head then loss (unfused)"),
        "",
        f"{'':28s}{'measured':>16s}{'predicted':>16s}   how",
        f"{'update (best of ' + str(s['timed_steps']) + ')':28s}{m['update_s_best']:>15.3f}s{p['update_s']:>15.3f}s"
        f"   estimate: FLOPs / ({p['gpu']} x MFU {p['mfu']})",
        f"{'update (median)':28s}{m['update_s_median']:>15.3f}s{'':>16s}",
        f"{'tokens / s':28s}{m['tokens_per_s']:>16,.0f}{p['tokens_per_s']:>16,.0f}",
        f"{'peak memory':28s}{mib(m['peak_bytes']):>16s}{mib(p['peak_bytes']):>16s}   {m['peak_basis']}; "
        f"predicted: {p['peak_basis']}",
    ]
    for phase in ("old/ref log-probs", "forward", "loss", "backward", "optimizer", "other"):
        predicted = p["phase_shares"].get(phase)
        lines.append(
            f"{'  ' + phase:28s}{pct(m['phase_shares'][phase]):>16s}"
            f"{(pct(predicted) if predicted is not None else '-'):>16s}"
        )
    if "rollout_s_best" in m:
        lines.append(
            f"{'rollout (generation)':28s}{m['rollout_s_best']:>15.3f}s{p['generation_s']:>15.3f}s"
            f"   {m['generated_tokens_per_s']:,.0f} tokens/s"
        )
        lines.append(f"{'weight hand-off':28s}{m['handoff_s_best']:>15.3f}s{'-':>16s}")
    gemms = ", ".join(f"{g['m']}x{g['k']}x{g['n']} {g['tflops'] * 1e3:.1f}" for g in f["matmul"]["gemms"])
    lines += [
        "",
        f"matmul floor: {f['seconds']:.3f}s = 3 x forward FLOPs ({(f['lm_head_flops'] + f['decoder_flops']) / 1e12:.3f} "
        f"TFLOP, LM head {f['lm_head_flops'] / (f['lm_head_flops'] + f['decoder_flops']):.0%}) at "
        f"{f['rate_tflops'] * 1e3:.1f} GFLOP/s ({f['matmul']['dtype']} GEMMs of the step's shapes, GFLOP/s: {gemms})",
        f"update / floor: {f['update_over_floor']:.2f}x",
    ]
    if "peak_over_prediction" in r:
        lines.append(f"peak memory / prediction: {r['peak_over_prediction']:.2f}")
    lines += [f"note: {n}" for n in p["notes"]]
    return "\n".join(lines)


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default="40m",
        help=f"a size ({', '.join(MODEL_SIZES)}: Qwen2 shapes with the Qwen vocabulary), a config JSON or a model folder",
    )
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--samples", type=int, default=8, help="samples per prompt")
    parser.add_argument("--response-tokens", type=int, default=128)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument(
        "--dtype", choices=["float32", "bfloat16"], default="float32", help="parameters (master weights)"
    )
    parser.add_argument("--sharded", action="store_true", help="shard on a CPU too (on CUDA the actor always shards)")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--logprob-impl", choices=["auto", "triton", "torch", "reference"], default="auto")
    parser.add_argument(
        "--fused-loss",
        choices=["auto", "always", "never"],
        default="never",
        help="algo.fused_loss: the LM head and the policy loss in one pass (auto: on a CPU; default never, as algo)",
    )
    parser.add_argument("--micro-batch-tokens", type=int, default=16384)
    parser.add_argument("--ppo-epochs", type=int, default=1)
    parser.add_argument("--mini-batches", type=int, default=1)
    parser.add_argument("--kl", action="store_true", help="a KL reference (its log-prob pass)")
    parser.add_argument(
        "--rollout", action="store_true", help="generate each step's responses with the hf engine first"
    )
    parser.add_argument("--engine-dtype", choices=["auto", "float32", "bfloat16"], default="auto")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--steps", type=int, default=3, help="timed steps")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument(
        "--clock", choices=["wall", "cpu"], default="wall", help="cpu: this process's CPU time (a shared machine)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mfu", type=float, default=0.3, help="the estimate's assumed matmul utilisation")
    parser.add_argument("--gpu", choices=["h100", "h200", "a100"], default=None, help="datasheet for the estimate")
    parser.add_argument("--json", default=None, help="also write every figure as JSON to this file")


def run(args) -> int:
    for name in ("prompts", "samples", "response_tokens", "prompt_tokens", "steps", "ppo_epochs", "mini_batches"):
        if getattr(args, name) < 1:
            print(f"cir bench step: --{name.replace('_', '-')} must be >= 1", file=sys.stderr)
            return 2
    try:
        report = run_step_bench(args)
    except ValueError as e:
        print(f"cir bench step: {e}", file=sys.stderr)
        return 2
    print(format_report(report))
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2))
        print(f"wrote {path}")
    return 0
