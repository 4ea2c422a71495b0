"""`cir bench estimate`: the per-GPU memory and step time a run should need, from its config.

These are estimates, not measurements: arithmetic on the model's shape, the config's batch and
a few stated assumptions (decode throughput, MFU, response length), so that a recipe can be
sized before a GPU is booked. `docs/scaling.md` shows the tables this module prints for the
recipes in `cir/configs/` and explains each term.

Memory per GPU, for N ranks (FSDP2 shards parameters, gradients and optimizer state over N):

- resident between steps: master weights, AdamW's two moments and the gradients, each
  `bytes(model.dtype) x params / N` (fp32: 4 + 8 + 4 = 16 bytes per parameter, over N);
- during the update, on top: the bf16 compute copy FSDP2 gathers (the root unit, i.e. the
  embeddings and LM head, plus two decoder layers: the one running and the one prefetched),
  the root unit's unsharded gradients before their fp32 reduce-scatter, and the activations
  of one micro-batch of `optim.micro_batch_tokens` tokens (with activation checkpointing: each
  layer's input plus one layer recomputed; without: every layer's saved tensors). The fused
  log-prob kernel keeps no [tokens, vocab] logits; what it saves is shown beside;
- the engine (vLLM) takes `run.engine_memory_fraction` of the GPU's total memory up front (its
  weights in `run.engine_dtype`, KV cache and working memory) and sleeps during the update
  (level 1: weights copied to host memory, KV cache dropped, both returned to the driver; a
  little it allocated outside its sleep pool stays);
- start-up: the trainer loads the policy on the CPU and starts the engine on an empty GPU,
  then FSDP2 moves the actor's shards in (see docs/scaling.md);
- waking after the update: the trainer empties PyTorch's CUDA cache before the engine wakes,
  so the engine's share comes back beside what stays allocated (the actor's resident state)
  and then takes the new weights, gathered in buckets, each reloaded by vLLM one layer at a time
  through a temporary copy of the layer (see `estimate` for the formula).

Step time: generation is this rank's generated tokens over an assumed per-GPU decode
throughput, or the longest response at the memory-bound decode-step latency (every step reads
the weights once) if that is longer; the update is its matmul FLOPs at an assumed MFU: one
forward pass is `ModelShape.forward_flops` (the decoder's weights and causal attention over every
token, the LM head over the response tokens only), the backward two passes more, plus one for
the checkpointed layers' recomputation, one for the old-log-prob pass when the update is not
strictly on-policy (`OptimConfig.on_policy`), one for a KL reference.

What the estimator takes from the parts it models instead of restating them: the bytes of a
dtype from the policy's dtype table (`cir.models.DTYPES`), what `run.engine_dtype: auto` means on
a GPU (`cir.engines.factory.engine_dtype`), vLLM's start-up rule and its reload's temporary
layer (`cir.engines.vllm.engine_start_bytes`, `reload_temporary_bytes`), and the actor's
on-policy rule (`cir.training.optim.OptimConfig.on_policy`). `cir bench step` measures a step
beside this model's prediction.

`estimate` takes numbers; `estimate_run` reads them from a `TrainConfig`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

GiB = 1024**3
MiB = 1024**2
REDUCE_BYTES = 4  # FSDP2's gradient reduce-scatter runs in fp32 (cir.training.sharding)
SYNC_BUCKET_BYTES = 256 << 20  # cir.training.actor.DEFAULT_BUCKET_BYTES (a test keeps them equal)


def dtype_bytes(name: str) -> int:
    """Bytes per element of a `model.dtype` / `run.engine_dtype` name ("float32", "bfloat16", ...)."""
    from cir.models import DTYPES

    if name not in DTYPES:
        raise ValueError(f"dtype {name!r}: choose one of {', '.join(DTYPES)}")
    return DTYPES[name].itemsize


def dtype_names() -> list[str]:
    from cir.models import DTYPE_NAMES

    return sorted(DTYPE_NAMES)


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a Qwen2/Llama-style decoder (what a Hugging Face config.json states)."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    tie_word_embeddings: bool
    max_position_embeddings: int
    qkv_bias: bool = True  # Qwen2 has biases on q, k and v

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def layer_params(self) -> int:
        """One decoder layer: attention (q, o: H x H; k, v: H x kv_dim), SwiGLU MLP (3 x H x I),
        two RMSNorm weights."""
        h, kv = self.hidden_size, self.num_kv_heads * self.head_dim
        attention = 2 * h * h + 2 * h * kv + ((h + 2 * kv) if self.qkv_bias else 0)
        return attention + 3 * h * self.intermediate_size + 2 * h

    @property
    def root_params(self) -> int:
        """What is not in a decoder layer (FSDP2's root unit): embeddings, LM head if untied,
        final norm."""
        embedding = self.vocab_size * self.hidden_size
        return embedding * (1 if self.tie_word_embeddings else 2) + self.hidden_size

    @property
    def params(self) -> int:
        return self.num_layers * self.layer_params + self.root_params

    @property
    def largest_tensor_params(self) -> int:
        """The largest single weight: the embedding (or LM head), or an MLP projection."""
        return self.hidden_size * max(self.vocab_size, self.intermediate_size)

    @property
    def largest_engine_layer_params(self) -> int:
        """The largest layer of the vLLM model, where q/k/v and gate/up are fused into one:
        the embedding (or LM head), gate_up_proj (2 x H x I) or qkv_proj."""
        h, kv = self.hidden_size, self.num_kv_heads * self.head_dim
        return max(self.vocab_size * h, 2 * h * self.intermediate_size, h * (h + 2 * kv))

    @property
    def layer_matmul_params(self) -> int:
        """The weights of one decoder layer that multiply every token (q, k, v, o and the MLP):
        each is 2 FLOPs per token in a forward pass."""
        h, kv = self.hidden_size, self.num_kv_heads * self.head_dim
        return 2 * h * h + 2 * h * kv + 3 * h * self.intermediate_size

    def forward_flops(self, tokens: int, lm_head_tokens: int, attention_token_pairs: int) -> float:
        """Matmul FLOPs of one forward pass: every token through the decoder layers' weights,
        causal attention (scores and weighted sum: 4 x H FLOPs per layer and (query, key) pair
        with key <= query), and the LM head over `lm_head_tokens` rows only (cir computes
        log-probs at response positions alone; the embedding is a lookup). The backward is twice
        this."""
        layers = self.num_layers * (
            2 * self.layer_matmul_params * tokens + 4 * self.hidden_size * attention_token_pairs
        )
        return layers + 2 * self.hidden_size * self.vocab_size * lm_head_tokens

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """KV cache per token: keys and values of every layer's KV heads."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_bytes

    def activation_bytes_per_token_layer(self, dtype_bytes: int) -> int:
        """Tensors one decoder layer saves for backward, per token, counted from the
        `transformers` Qwen2 layer: two RMSNorms computing in fp32 (about 3 x H elements of
        `dtype_bytes` each), q and attention output, k and v repeated to all heads for SDPA,
        o_proj's input (6 x H), and the MLP's gate, up, activation and product (4 x I).
        Approximate: it ignores small per-token terms (RoPE tables, SDPA's log-sum-exp)."""
        return (12 * self.hidden_size + 4 * self.intermediate_size) * dtype_bytes

    @classmethod
    def from_hf_config(cls, config: dict) -> ModelShape:
        return cls(
            hidden_size=int(config["hidden_size"]),
            intermediate_size=int(config["intermediate_size"]),
            num_layers=int(config["num_hidden_layers"]),
            num_heads=int(config["num_attention_heads"]),
            num_kv_heads=int(config.get("num_key_value_heads") or config["num_attention_heads"]),
            vocab_size=int(config["vocab_size"]),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            max_position_embeddings=int(config.get("max_position_embeddings", 4096)),
            qkv_bias=config.get("model_type", "qwen2") == "qwen2",
        )


# The shapes of the recipes' models (their Hugging Face config.json), so that an estimate needs
# no download. A local model folder is read instead.
KNOWN_MODELS: dict[str, ModelShape] = {
    "Qwen/Qwen2.5-Math-7B": ModelShape(3584, 18944, 28, 28, 4, 152064, False, 4096),
    "Qwen/Qwen2.5-Math-1.5B": ModelShape(1536, 8960, 28, 12, 2, 151936, True, 4096),
    "Qwen/Qwen2.5-1.5B-Instruct": ModelShape(1536, 8960, 28, 12, 2, 151936, True, 32768),
    "Qwen/Qwen2.5-7B-Instruct": ModelShape(3584, 18944, 28, 28, 4, 152064, False, 32768),
}


def model_shape(path: str) -> ModelShape:
    """The shape of `path`: a local Hugging Face folder's config.json, or a known hub name."""
    config = Path(path).expanduser() / "config.json"
    if config.is_file():
        return ModelShape.from_hf_config(json.loads(config.read_text()))
    if path in KNOWN_MODELS:
        return KNOWN_MODELS[path]
    raise ValueError(f"model {path!r}: no local config.json and not one of {', '.join(KNOWN_MODELS)}")


def causal_pairs(length: int) -> int:
    """(query, key) pairs a causal attention computes over one sequence of `length` tokens."""
    return length * (length + 1) // 2


@dataclass(frozen=True)
class GPU:
    """A device's memory (the total the driver reports, in bytes: what vLLM's share is taken
    of) and its datasheet bandwidth and dense matmul peak in the update's compute dtype (bf16
    tensor cores for the GPUs below)."""

    name: str
    memory_bytes: int
    hbm_tb_per_s: float
    matmul_tflops: float


# The "80 GB" of an H100 is not 80 GiB: the driver reports 81,559 MiB (79.6 GiB) on the H100 SXM
# and 143,771 MiB (140.4 GiB) on the H200 (nvidia-smi on the lent machines, 2026-11), and
# 81,920 MiB on the A100 80 GB (NVIDIA's published nvidia-smi output; not read here).
GPUS: dict[str, GPU] = {
    "h100": GPU("H100 SXM 80 GB", 81559 * MiB, 3.35, 989),
    "h200": GPU("H200 SXM 141 GB", 143771 * MiB, 4.8, 989),
    "a100": GPU("A100 SXM 80 GB", 81920 * MiB, 2.04, 312),
}


@dataclass(frozen=True)
class Assumptions:
    """What the estimate assumes and does not derive; each can be overridden.

    prompt_tokens, mean_response_tokens: the mean prompt and response (model tokens and
        interpreter output) length.
    decode_tokens_per_s: per-GPU vLLM decode throughput of a bf16 model at 128+ running
        sequences; None: 2,500 for a 7B-class model, 7,500 for a model under 3B parameters
        (round figures in the range public vLLM serving benchmarks report for such models on
        one H100; not measured here). Halved for an fp32 engine (it reads twice the bytes).
    hbm_efficiency: the share of HBM bandwidth one decode step achieves (for the step
        latency that bounds the longest response).
    mfu: FLOPs utilisation of the update (recomputation and the old-log-prob pass counted as work).
    engine_overhead_gib: vLLM's memory besides weights and KV cache (activations, CUDA graphs).
    engine_asleep_gib: what a sleeping engine keeps on the GPU.
    reserve_gib: CUDA context, NCCL buffers and allocator fragmentation per process.
    """

    prompt_tokens: int = 150
    mean_response_tokens: int = 1000
    decode_tokens_per_s: float | None = None
    hbm_efficiency: float = 0.5
    mfu: float = 0.3
    engine_overhead_gib: float = 2.0
    engine_asleep_gib: float = 1.0
    reserve_gib: float = 2.0

    def decode_rate(self, params: int, engine_bytes: int) -> float:
        bf16 = self.decode_tokens_per_s or (2500.0 if params >= 3e9 else 7500.0)
        return bf16 * 2 / engine_bytes


@dataclass
class Estimate:
    """Per-GPU bytes and per-step seconds of one run (see the module docstring)."""

    gpu: str
    gpus: int
    params: int
    engine_dtype: str
    engine_memory_fraction: float
    # memory (bytes, per GPU)
    master_weights: float
    optimizer_states: float
    gradients: float
    gathered_params: float
    unsharded_grads: float
    activations: float
    activations_without_checkpointing: float
    activations_with_checkpointing: float
    logits_avoided: float
    engine: float
    engine_weights: float
    kv_cache: float
    kv_tokens: int
    kv_tokens_needed: int
    free_at_engine_start: float
    rollout_peak: float
    update_allocated: float
    update_peak: float
    weight_sync: float
    reload_temporary: float
    wake_peak: float
    gpu_memory: float
    # time (per step)
    trajectories: int
    trajectories_per_rank: int
    generated_tokens: int
    decode_tokens_per_s: float
    decode_step_s: float
    generation_s: float
    train_tokens: int
    train_flops: float
    update_passes: dict[str, float]  # forward-pass equivalents per phase (sums to train_flops / one pass)
    update_s: float
    notes: list[str] = field(default_factory=list)

    @property
    def actor_resident(self) -> float:
        return self.master_weights + self.optimizer_states + self.gradients

    @property
    def engine_starts(self) -> bool:
        return self.free_at_engine_start >= self.engine

    @property
    def fits(self) -> bool:
        return self.engine_starts and max(self.rollout_peak, self.update_peak, self.wake_peak) <= self.gpu_memory

    @property
    def step_s(self) -> float:
        return self.generation_s + self.update_s

    def rows(self, compare: bool = False) -> list[tuple[str, str, str]]:
        """(quantity, value, how it is computed) for the printed table (`compare`: the "how" of
        a table of several estimates, which names no one GPU)."""
        g = lambda b: f"{b / GiB:.1f} GiB"  # noqa: E731
        return [
            ("parameters", f"{self.params / 1e9:.2f} B", "from the model's config"),
            ("master weights", g(self.master_weights), "bytes(model.dtype) x P / N"),
            ("AdamW moments", g(self.optimizer_states), "2 x bytes(model.dtype) x P / N"),
            ("gradients", g(self.gradients), "bytes(model.dtype) x P / N"),
            ("gathered compute params", g(self.gathered_params), "bf16 x (root + 2 layers)"),
            ("unsharded grads before reduce", g(self.unsharded_grads), "(bf16 + fp32) x (root + 1 layer)"),
            ("activations, with checkpointing", g(self.activations_with_checkpointing), "T x (L x H + 1 layer)"),
            ("activations, no checkpointing", g(self.activations_without_checkpointing), "T x L x layer"),
            ("[T, vocab] logits avoided", g(self.logits_avoided), "T x V x fp32 x 2 (with grad)"),
            ("update peak", g(self.update_peak), "resident + gathered + grads + acts + asleep"),
            ("engine (vLLM)", g(self.engine), "run.engine_memory_fraction x GPU"),
            ("  engine weights", g(self.engine_weights), "bytes(run.engine_dtype) x P"),
            ("  KV cache", f"{g(self.kv_cache)} = {self.kv_tokens / 1e3:.0f}k tokens", "engine - weights - overhead"),
            ("  KV tokens, all in flight", f"{self.kv_tokens_needed / 1e3:.0f}k", "trajs/rank x (prompt + mean resp)"),
            ("rollout peak", g(self.rollout_peak), "resident + engine + reserve"),
            ("weight-sync buckets", g(self.weight_sync), "2 x (256 MiB + largest tensor), if N > 1"),
            ("reload's layer copy", g(self.reload_temporary), "bytes(run.engine_dtype) x largest vLLM layer"),
            ("engine awake, taking the weights", g(self.wake_peak), "resident + engine + sync + copy + reserve"),
            ("free when the engine starts", g(self.free_at_engine_start), "GPU - reserve (policy on the CPU)"),
            ("GPU memory", g(self.gpu_memory), self.gpu if not compare else "driver's total"),
            ("fits", "yes" if self.fits else "NO", "engine starts; the three peaks <= GPU memory"),
            (
                "trajectories / step (per rank)",
                f"{self.trajectories} ({self.trajectories_per_rank})",
                "prompts x group",
            ),
            ("generated tokens / step", f"{self.generated_tokens / 1e6:.2f} M", "trajectories x mean response"),
            ("decode tokens/s per GPU", f"{self.decode_tokens_per_s:,.0f}", "assumed"),
            ("decode step (memory-bound)", f"{self.decode_step_s * 1e3:.1f} ms", "engine weights / (HBM x eff)"),
            ("generation", f"{self.generation_s:.0f} s", "max(tokens/rank / rate, longest x step)"),
            ("update FLOPs", f"{self.train_flops / 1e15:.0f} PFLOP", "passes x forward FLOPs"),
            ("update", f"{self.update_s:.0f} s", "FLOPs / (N x peak x MFU)"),
            ("step", f"{self.step_s:.0f} s", "generation + update"),
        ]


def update_passes(
    *, ppo_epochs: int, on_policy: bool, gradient_checkpointing: bool, kl_reference: bool
) -> dict[str, float]:
    """The update's work in forward-pass equivalents, by phase: forward 1 and backward 2 per
    epoch, the checkpointed layers' recomputation 1 per epoch, the old log-probs 1 when the update
    is not strictly on-policy, the KL reference 1. (The recomputation is counted over the whole
    model: an approximation, the LM head is not checkpointed.)"""
    passes = {"old/ref log-probs": 0.0, "forward": float(ppo_epochs), "backward": 2.0 * ppo_epochs}
    if gradient_checkpointing:
        passes["backward"] += ppo_epochs
    if not on_policy:
        passes["old/ref log-probs"] += 1
    if kl_reference:
        passes["old/ref log-probs"] += 1
    return passes


def estimate(
    shape: ModelShape,
    *,
    gpus: int,
    gpu: GPU,
    prompts_per_step: int,
    group_size: int,
    max_response_tokens: int,
    micro_batch_tokens: int,
    gradient_checkpointing: bool,
    param_dtype: str = "float32",
    engine_dtype: str = "bfloat16",
    engine_memory_fraction: float = 0.5,
    ppo_epochs: int = 1,
    mini_batches: int = 1,
    kl_reference: bool = False,
    sync_bucket_bytes: int = SYNC_BUCKET_BYTES,
    sharded: bool | None = None,
    assumptions: Assumptions = Assumptions(),
) -> Estimate:
    """The estimate for one run on `gpus` GPUs of kind `gpu` (see the module docstring).
    `engine_dtype`, `engine_memory_fraction`: as `run.engine_dtype` ("auto" is bfloat16 on a
    GPU) and `run.engine_memory_fraction`; `sync_bucket_bytes`: the weight sync's bucket size.
    `sharded`: the actor is FSDP2-sharded (bf16 compute, fp32 master weights); default: the
    actor's own rule on CUDA (`cir.training.sharding.should_shard`: always, one rank included)."""
    from cir.engines.vllm import engine_start_bytes, reload_temporary_bytes
    from cir.training.optim import OptimConfig
    from cir.training.sharding import should_shard

    if gpus < 1:
        raise ValueError(f"gpus={gpus}: must be >= 1")
    if not 0 < engine_memory_fraction < 1:
        raise ValueError(f"engine_memory_fraction={engine_memory_fraction}: must be in (0, 1)")
    a, n, p = assumptions, gpus, shape.params
    sharded = should_shard(n, "cuda") if sharded is None else sharded
    pb = dtype_bytes(param_dtype)
    engine_dtype = gpu_engine_dtype(engine_dtype)
    eb = dtype_bytes(engine_dtype)
    # FSDP2 computes in bf16 on CUDA; the plain module computes in the parameters' dtype.
    cb = 2 if sharded else pb
    notes: list[str] = []

    master, optimizer, grads = pb * p / n, 2 * pb * p / n, pb * p / n
    layer, root = shape.layer_params, shape.root_params
    gathered = cb * (root + 2 * layer) if sharded else 0.0
    unsharded = (cb + REDUCE_BYTES) * (root + layer) if sharded else 0.0
    t = micro_batch_tokens
    per_layer = shape.activation_bytes_per_token_layer(cb)
    # Both add the final hidden states and the rows gathered for the LM head (2 x H per token).
    tail = 2 * t * shape.hidden_size * cb
    with_ckpt = t * (shape.num_layers * shape.hidden_size * cb + per_layer) + tail
    without_ckpt = t * shape.num_layers * per_layer + tail
    activations = with_ckpt if gradient_checkpointing else without_ckpt
    logits_avoided = 2 * t * shape.vocab_size * 4

    gpu_bytes = float(gpu.memory_bytes)
    reserve = a.reserve_gib * GiB
    engine = float(engine_start_bytes(gpu_bytes, engine_memory_fraction))
    engine_weights = eb * p
    kv_cache = max(0.0, engine - engine_weights - a.engine_overhead_gib * GiB)
    kv_tokens = int(kv_cache // shape.kv_bytes_per_token(eb))
    context = shape.max_position_embeddings
    response_cap = max(1, min(max_response_tokens, context - a.prompt_tokens))
    if response_cap < max_response_tokens:
        notes.append(f"the model's context ({context}) leaves {response_cap} response tokens after the prompt")
    mean_response = min(a.mean_response_tokens, response_cap)
    per_rank = math.ceil(prompts_per_step / n) * group_size
    if prompts_per_step % n:
        notes.append(f"{prompts_per_step} prompts do not split evenly over {n} ranks")
    kv_needed = per_rank * (a.prompt_tokens + mean_response)
    if kv_needed > kv_tokens:
        notes.append("the KV cache holds fewer tokens than all of a rank's trajectories in flight: vLLM preempts")

    resident = master + optimizer + grads
    rollout_peak = resident + engine + reserve
    # What torch.cuda.max_memory_allocated shows for the update (the sleeping engine's leftovers
    # and the reserve are outside PyTorch's allocator).
    update_allocated = resident + gathered + unsharded + activations
    update_peak = update_allocated + a.engine_asleep_gib * GiB + reserve
    # Waking (cir.training.trainer): torch.cuda.empty_cache() runs after the update and before
    # engine.wake(), so the update's gathered weights, unsharded gradients and activations go back
    # to the driver. What stays allocated is the resident state: the sharded master weights, AdamW's
    # moments, and the sharded gradients (zeroed with set_to_none only at the next mini-batch). The
    # engine's asleep leftovers are part of its share, so waking brings it back to `engine` in all:
    #   wake_peak = resident + engine + weight_sync + reload_temporary + reserve
    # weight_sync: sync_weights then gathers full tensors in model.dtype (FSDP2's full_tensor) in
    # buckets of >= 256 MiB, each closed by the tensor that crosses the mark, and the loop still
    # holds the previous bucket while the next is gathered: at most 2 x (256 MiB + the largest
    # tensor). A plain module hands over its live parameters: no copy. vLLM reloads each
    # layer through a temporary copy of it (reload_temporary_bytes), on top of its share.
    # empty_cache releases only wholly free segments; one pinned by a live block (a gradient shard
    # carved out of a cached activation block) stays, which the reserve is assumed to cover.
    weight_sync = 2 * (sync_bucket_bytes + pb * shape.largest_tensor_params) if sharded else 0.0
    reload_temporary = float(reload_temporary_bytes(shape.largest_engine_layer_params, eb))
    wake_peak = resident + engine + weight_sync + reload_temporary + reserve
    # The policy is still on the CPU when the engine starts (cir.training.trainer): only this
    # process's CUDA context and buffers are on the GPU.
    free_at_start = gpu_bytes - reserve
    if free_at_start < engine:
        notes.append("vLLM refuses to start: less free memory than engine_memory_fraction x GPU")
    if wake_peak > gpu_bytes:
        notes.append("the engine's share does not fit beside the actor's state when it wakes and takes the weights")

    trajectories = prompts_per_step * group_size
    generated = trajectories * mean_response
    rate = a.decode_rate(p, eb)
    step_latency = engine_weights / (gpu.hbm_tb_per_s * 1e12 * a.hbm_efficiency)
    generation = max(per_rank * mean_response / rate, response_cap * step_latency)
    sequence = a.prompt_tokens + mean_response
    train_tokens = trajectories * sequence
    one_pass = shape.forward_flops(train_tokens, trajectories * mean_response, trajectories * causal_pairs(sequence))
    passes = update_passes(
        ppo_epochs=ppo_epochs,
        on_policy=OptimConfig(ppo_epochs=ppo_epochs, mini_batches=mini_batches).on_policy,
        gradient_checkpointing=gradient_checkpointing,
        kl_reference=kl_reference,
    )
    flops = sum(passes.values()) * one_pass
    update = flops / (n * gpu.matmul_tflops * 1e12 * a.mfu)
    return Estimate(
        gpu=gpu.name,
        gpus=n,
        params=p,
        engine_dtype=engine_dtype,
        engine_memory_fraction=engine_memory_fraction,
        master_weights=master,
        optimizer_states=optimizer,
        gradients=grads,
        gathered_params=gathered,
        unsharded_grads=unsharded,
        activations=activations,
        activations_without_checkpointing=without_ckpt,
        activations_with_checkpointing=with_ckpt,
        logits_avoided=logits_avoided,
        engine=engine,
        engine_weights=engine_weights,
        kv_cache=kv_cache,
        kv_tokens=kv_tokens,
        kv_tokens_needed=kv_needed,
        free_at_engine_start=free_at_start,
        rollout_peak=rollout_peak,
        update_allocated=update_allocated,
        update_peak=update_peak,
        weight_sync=weight_sync,
        reload_temporary=reload_temporary,
        wake_peak=wake_peak,
        gpu_memory=gpu_bytes,
        trajectories=trajectories,
        trajectories_per_rank=per_rank,
        generated_tokens=generated,
        decode_tokens_per_s=rate,
        decode_step_s=step_latency,
        generation_s=generation,
        train_tokens=train_tokens,
        train_flops=flops,
        update_passes=passes,
        update_s=update,
        notes=notes,
    )


def gpu_engine_dtype(name: str) -> str:
    """`run.engine_dtype` on a GPU, as the trainer resolves it (`cir.engines.factory.engine_dtype`:
    "auto" is bfloat16 there)."""
    from cir.engines.factory import engine_dtype

    return engine_dtype(name, "cuda")


def estimate_run(
    cfg,
    gpus: int,
    gpu: str = "h100",
    *,
    engine_dtype: str | None = None,
    engine_memory_fraction: float | None = None,
    assumptions: Assumptions = Assumptions(),
) -> Estimate:
    """`estimate` for a `TrainConfig`: the model's shape from `model.path`, the batch from
    `algo`, the longest response over the `schedule`, the micro-batch from `optim`, the engine's
    dtype and memory share from `run` unless given here."""
    longest = max([cfg.rollout.max_response_tokens] + [s.max_response_tokens or 0 for s in cfg.schedule])
    return estimate(
        model_shape(cfg.model.path),
        gpus=gpus,
        gpu=GPUS[gpu],
        prompts_per_step=cfg.algo.prompts_per_step,
        group_size=cfg.algo.group_size,
        max_response_tokens=longest,
        micro_batch_tokens=cfg.optim.micro_batch_tokens,
        gradient_checkpointing=cfg.model.gradient_checkpointing,
        param_dtype=cfg.model.dtype,
        engine_dtype=cfg.run.engine_dtype if engine_dtype is None else engine_dtype,
        engine_memory_fraction=(
            cfg.run.engine_memory_fraction if engine_memory_fraction is None else engine_memory_fraction
        ),
        ppo_epochs=cfg.optim.ppo_epochs,
        mini_batches=cfg.optim.mini_batches,
        kl_reference=cfg.algo.kl_coef > 0,
        assumptions=assumptions,
    )


def format_table(est: Estimate, markdown: bool = False) -> str:
    rows = est.rows()
    if markdown:
        lines = ["| quantity | per GPU / per step | how |", "| --- | --- | --- |"]
        lines += [f"| {q.strip()} | {v} | {h} |" for q, v, h in rows]
    else:
        width = max(len(q) for q, _, _ in rows) + 2
        lines = [f"{q:<{width}}{v:>22}   {h}" for q, v, h in rows]
    lines += [f"note: {n}" for n in est.notes]
    return "\n".join(lines)


def comparison_table(columns: list[tuple[str, Estimate]]) -> str:
    """A Markdown table with one column per (title, estimate): the table of docs/scaling.md."""
    titles = [title for title, _ in columns]
    lines = ["| quantity | " + " | ".join(titles) + " | how |", "| --- |" + " --- |" * len(titles) + " --- |"]
    for i, (quantity, _, how) in enumerate(columns[0][1].rows(compare=True)):
        values = [est.rows()[i][1] for _, est in columns]
        lines.append(f"| {quantity.strip()} | " + " | ".join(values) + f" | {how} |")
    return "\n".join(lines)


def scaling_doc_table() -> str:
    """The table of docs/scaling.md: each bundled recipe as configured (its engine dtype and
    memory share), on the GPUs it is written for, and the one-node 7B recipe on H200s."""
    from cir.training.config import load_train_config

    seven, multi, small = (load_train_config(name) for name in RECIPES)
    return comparison_table(
        [
            ("7B, 8 x H100", estimate_run(seven, 8, "h100")),
            ("7B, 8 x H200", estimate_run(seven, 8, "h200")),
            ("7B, 4 x 8 x H100", estimate_run(multi, 32, "h100")),
            ("1.5B, 8 x H100", estimate_run(small, 8, "h100")),
        ]
    )


# The GPU recipes in cir/configs, as docs/scaling.md tabulates them.
RECIPES = ("qwen2.5-math-7b-8gpu", "qwen2.5-math-7b-4x8gpu", "qwen2.5-math-1.5b-8gpu")


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="a YAML file or a bundled recipe name (see cir/configs)")
    parser.add_argument("--gpus", type=int, required=True, help="ranks in all (nodes x GPUs per node)")
    parser.add_argument("--gpu", choices=sorted(GPUS), default="h100", help="the GPU's datasheet figures")
    parser.add_argument(
        "--engine-dtype", choices=["auto", *dtype_names()], default=None, help="default: run.engine_dtype"
    )
    parser.add_argument(
        "--engine-memory-fraction", type=float, default=None, help="default: run.engine_memory_fraction"
    )
    defaults = Assumptions()
    for name in ("prompt_tokens", "mean_response_tokens", "decode_tokens_per_s", "mfu"):
        value = getattr(defaults, name)
        parser.add_argument(
            "--" + name.replace("_", "-"), type=float, default=value, help=f"assumption (default {value})"
        )
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    parser.add_argument("--json", default=None, help="also write the estimate as JSON to this file")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, as for cir train")


def run(args) -> int:
    from cir.config_loader import ConfigError
    from cir.training.config import load_train_config

    try:
        cfg = load_train_config(args.config, args.overrides)
        assumptions = Assumptions(
            prompt_tokens=int(args.prompt_tokens),
            mean_response_tokens=int(args.mean_response_tokens),
            decode_tokens_per_s=args.decode_tokens_per_s,
            mfu=args.mfu,
        )
        est = estimate_run(
            cfg,
            args.gpus,
            args.gpu,
            engine_dtype=args.engine_dtype,
            engine_memory_fraction=args.engine_memory_fraction,
            assumptions=assumptions,
        )
    except (ConfigError, ValueError) as e:
        print(f"cir bench estimate: {e}", file=sys.stderr)
        return 2
    print(
        f"{args.config} on {args.gpus} x {est.gpu}, engine in {est.engine_dtype} with {est.engine_memory_fraction:g}"
        " of the GPU (estimates, not measurements)"
    )
    print(format_table(est, markdown=args.markdown))
    if args.json:
        Path(args.json).write_text(json.dumps({**asdict(est), "assumptions": asdict(assumptions)}, indent=2))
    return 0
