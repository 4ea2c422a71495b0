"""The actor: the one owner of the policy's weights, optimizer and learning-rate schedule.

Everything the trainer does with the policy goes through `Actor`:

- `update(batch)`: old and reference log-probs where needed, then the masked clipped loss over
  micro-batches and one optimizer step per mini-batch (per PPO epoch); returns metrics;
- `save_sharded_state(path)` / `load_sharded_state(path, state)`: the optimizer's state as a
  sharded `torch.distributed.checkpoint` (each rank its shard; any number of ranks reads it
  back), plus the small replicated rest (the LR scheduler) for the trainer's state file;
- `save_pretrained(path)`: the policy as a Hugging Face folder;
- `iter_weights(bucket_bytes)`: the only way weights leave the trainer, as buckets of full
  tensors under Hugging Face names; `sync_weights(actor, engine)` hands them to an engine.

One class for one process and for many (torchrun): the model is sharded with FSDP2 when the
actor is built where that applies (`cir.training.sharding`: several ranks, or CUDA), and the
training step is the same code either way. With several ranks, what the step must respect:

- Every forward/backward of a sharded model is a collective, so every rank runs as many: a rank
  with fewer micro-batches (or none: dynamic sampling may keep no group of its shard) runs
  placeholder passes whose loss is multiplied by zero. In one process there are none.
- Gradients are averaged over ranks by FSDP's reduce-scatter; micro-batch weights carry a
  `world_size` factor (`cir.algorithms.micro_batch_weight`), so the result is the gradient of
  the global batch's loss.
- Metrics are token-weighted over every rank's micro-batches (`UpdateMetrics`).
"""

from __future__ import annotations

import contextlib
import copy
import math
import sys
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

from cir.algorithms import AlgoConfig, compute_policy_loss, get_policy_loss, micro_batch_weight
from cir.algorithms.correction import importance_weights, mismatch_metrics
from cir.algorithms.losses import token_loss
from cir.config_loader import ConfigError
from cir.distributed import DistributedContext
from cir.kernels.linear_logprob import HAS_TRITON
from cir.training import export
from cir.training.batch import MicroBatch, TrainBatch
from cir.training.logprobs import ResponseLogprobs
from cir.training.optim import OptimConfig, ShardingConfig, attention_precision_problem, lr_multiplier
from cir.training.sharding import compute_dtype, device_mesh, full_tensor, shard_policy, should_shard

NamedTensors = list[tuple[str, torch.Tensor]]

# Weights leave the actor in buckets of about this many bytes (a bounded staging cost per
# hand-off, however large the model).
DEFAULT_BUCKET_BYTES = 256 << 20


def sync_weights(actor: Actor, engine, bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> None:
    """Hand the actor's current weights to `engine`, one bucket at a time."""
    for bucket in actor.iter_weights(bucket_bytes):
        engine.load_weights(bucket)


@dataclass(frozen=True)
class FixedLogprobs:
    """Per-token log-probs of one micro-batch that stay fixed through the update, [n] each: under
    the policy before the update (`old`; None when strictly on-policy: the current forward's
    own, detached) and under the KL reference (`ref`; None without a KL term). The actor keeps
    them beside the batch; the micro-batches it was handed are not changed."""

    old: torch.Tensor | None = None
    ref: torch.Tensor | None = None


def micro_batch_loss(
    policy: ResponseLogprobs,
    mb: MicroBatch,
    algo: AlgoConfig,
    fixed: FixedLogprobs,
    *,
    temperature: float,
    max_response_tokens: int,
    fused: bool = False,
):
    """Loss (self-normalised over `mb`) and metrics of one micro-batch, with gradient.

    Unfused: `linear_logprob`, then the policy loss on its log-probs (the plain composition).
    `fused`: the LM head and the loss in one pass (`cir.kernels.linear_loss`), the per-token loss
    handed to it as `cir.algorithms.losses.token_loss`; its gradients are computed in the forward,
    and the metrics come from the registered loss on the pass's log-probs, as unfused. Fused needs
    the old log-probs before the pass when a rollout correction reweights the advantages (see
    `fused_loss_problem`).
    """
    loss_args = dict(
        clip_low=algo.clip_low,
        clip_high=algo.clip_high,
        dual_clip=algo.dual_clip,
        aggregation=algo.aggregation,
        kl_coef=algo.kl_coef,
        kl_type=algo.kl_type,
        kl_cap=algo.kl_cap,
        entropy_coef=algo.entropy_coef,
        cu_seqlens=mb.cu_seqlens,
        max_seq_len_norm=max_response_tokens,
    )
    if fused:
        advantages, weights = _corrected_advantages(mb, algo, fixed.old)
        per_token = token_loss(
            algo.policy_loss, fixed.old, advantages, mb.loss_mask, ref_logprob=fixed.ref, **loss_args
        )
        loss, logprob, entropy = policy.of(
            mb, temperature=temperature, with_entropy=True, impl=algo.logprob_impl, token_loss=per_token
        )
        old = fixed.old if fixed.old is not None else logprob
        with torch.no_grad():
            _, metrics = compute_policy_loss(
                algo.policy_loss, logprob, old, advantages, mb.loss_mask, ref_logprob=fixed.ref, entropy=entropy,
                impl=algo.loss_impl, **loss_args,
            )  # fmt: skip
    else:
        logprob, entropy = policy.of(mb, temperature=temperature, with_entropy=True, impl=algo.logprob_impl)
        old = fixed.old if fixed.old is not None else logprob.detach()
        advantages, weights = _corrected_advantages(mb, algo, old)
        loss, metrics = compute_policy_loss(
            algo.policy_loss, logprob, old, advantages, mb.loss_mask, ref_logprob=fixed.ref, entropy=entropy,
            impl=algo.loss_impl, **loss_args,
        )  # fmt: skip
    # How far the trainer's log-probs are from the sampler's (same weights): ~0 when engine and
    # trainer compute alike; large when they disagree (precision, kernels, a tokenization drift).
    m = mb.loss_mask
    n = m.sum().clamp(min=1)
    metrics = {**metrics, **mismatch_metrics(logprob, mb.sampler_logprobs, m)}
    if weights is not None:
        metrics["rollout_correction_weight"] = (weights * m).sum() / n
    if entropy is not None and "entropy" not in metrics:
        metrics["entropy"] = (entropy.detach() * m).sum() / n
    return loss, metrics


def _corrected_advantages(mb: MicroBatch, algo: AlgoConfig, old: torch.Tensor | None):
    """The advantages the loss sees (per trajectory, or per token once the sampler/trainer
    correction weights them) and the correction's weights (None without one)."""
    if algo.rollout_correction == "none":
        return mb.advantages, None
    if old is None:
        raise ValueError("a rollout correction needs the old log-probs before the fused pass (off-policy)")
    weights = importance_weights(
        old,
        mb.sampler_logprobs,
        mb.loss_mask,
        mb.cu_seqlens,
        mode=algo.rollout_correction,
        cap=algo.rollout_correction_cap,
    )
    lengths = mb.cu_seqlens[1:] - mb.cu_seqlens[:-1]
    return torch.repeat_interleave(mb.advantages, lengths) * weights, weights


def fused_loss_problem(algo: AlgoConfig, on_policy: bool) -> str | None:
    """Why the update cannot compute the LM head and the loss in one pass, or None if it can."""
    if get_policy_loss(algo.policy_loss).per_token is None:
        return f"the policy loss {algo.policy_loss!r} registers no per-token term"
    for name in ("logprob_impl", "loss_impl"):
        if getattr(algo, name) in ("reference", "triton"):
            return f"algo.{name}={getattr(algo, name)} asks for the unfused kernels"
    if on_policy and algo.rollout_correction != "none":
        # The correction's weights need every old log-prob first; on-policy they are the pass's own.
        return f"algo.rollout_correction={algo.rollout_correction} on-policy weighs by the pass's own log-probs"
    return None


def uses_fused_loss(algo: AlgoConfig, on_policy: bool, device: torch.device) -> bool:
    """`algo.fused_loss` resolved: "never"; "always" (a ConfigError where it cannot apply); "auto":
    where it applies and `linear_logprob` would take its torch path (no Triton on this device)."""
    if algo.fused_loss == "never":
        return False
    problem = fused_loss_problem(algo, on_policy)
    if algo.fused_loss == "always":
        if problem is not None:
            raise ConfigError(f"algo.fused_loss=always: {problem}")
        return True
    torch_path = algo.logprob_impl == "torch" or not (torch.device(device).type == "cuda" and HAS_TRITON)
    return problem is None and torch_path


class UpdateMetrics:
    """The update's metrics, accumulated micro-batch by micro-batch and reduced over ranks once.

    A metric is a mean over model tokens (each micro-batch's value weighted by its token count,
    summed over every rank's micro-batches before dividing), except keys ending in `_max`,
    which are maxima over tokens (the largest over micro-batches and ranks)."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.maxima: dict[str, float] = {}
        self.weight = 0.0

    def add(self, metrics: Mapping[str, float | torch.Tensor], weight: float) -> None:
        self.weight += weight
        for k, v in metrics.items():
            if k.endswith("_max"):
                self.maxima[k] = max(self.maxima.get(k, 0.0), float(v))
            else:
                self.sums[k] = self.sums.get(k, 0.0) + float(v) * weight

    def expect(self, keys: Iterable[str]) -> None:
        """Bring `keys` to the reduction at weight 0 (a placeholder pass: a rank with nothing to
        add still holds every key, as the reductions pair values by position)."""
        for k in keys:
            (self.maxima if k.endswith("_max") else self.sums).setdefault(k, 0.0)

    def reduce(self, dist: DistributedContext) -> dict[str, float]:
        """Every metric over all ranks (a collective: every rank calls it)."""
        # Sorted: the reductions pair values by position, and ranks may have met keys in another order.
        local = {k: self.sums[k] / max(self.weight, 1) for k in sorted(self.sums)}
        out = dist.mean_metrics(local, weight=self.weight)
        out |= {k: dist.max_float(self.maxima[k]) for k in sorted(self.maxima)}
        return out


class Actor:
    """The policy, its optimizer and LR schedule, in one process or sharded over the ranks of a
    torchrun job.

    `total_optimizer_steps` sets the length of the LR schedule's decay. With `algo.kl_coef > 0`
    a frozen copy of the initial policy serves as the KL reference (`reference`: another model
    instead, e.g. a resumed run's initial policy). `sharding` lays the model out over ranks
    (`cir.training.sharding`); `shard` overrides whether it is sharded at all (default: with
    several ranks or on CUDA). The model is used where it is (one process) or moved to the
    mesh's device as it is sharded.
    """

    def __init__(
        self,
        model,
        tokenizer,
        optim: OptimConfig,
        algo: AlgoConfig,
        *,
        total_optimizer_steps: int,
        sharding: ShardingConfig | None = None,
        dist: DistributedContext | None = None,
        reference=None,
        shard: bool | None = None,
    ):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.optim_config = optim
        self.algo = algo
        self.dist = dist or DistributedContext()
        sharding = sharding or ShardingConfig()
        # Several ranks compute where their collectives run; one process where its model is.
        device_type = self.dist.device if self.dist.world_size > 1 else next(model.parameters()).device.type
        self.sharded = should_shard(self.dist.world_size, device_type) if shard is None else shard
        if not self.sharded and self.dist.world_size > 1:
            raise ValueError(f"{self.dist.world_size} ranks train one sharded model: shard=False is for one process")
        # flash-attn computes in bf16/fp16 only: a policy that computes in fp32 would fail at its
        # first forward, after a whole rollout; refuse now (the config refuses what it can know).
        self.compute_dtype = compute_dtype(model, sharding, device_type, self.sharded)
        problem = attention_precision_problem(
            getattr(model.config, "_attn_implementation", None) or "",
            str(self.compute_dtype).removeprefix("torch."),
            device_type,
        )
        if problem is not None:
            raise ConfigError(problem)
        ref = None
        if algo.kl_coef > 0:  # the KL reference: `reference` if given, else the policy as it starts
            ref = _frozen_copy(model) if reference is None else _frozen(reference)
        mesh = device_mesh(sharding, self.dist.world_size, device_type) if self.sharded else None
        self.policy = self._prepare(ResponseLogprobs(model), mesh, sharding)
        self.ref_policy = None if ref is None else self._prepare(ResponseLogprobs(ref), mesh, sharding)
        self.device = next(self.policy.parameters()).device
        # The LM head and the policy loss in one pass, or linear_logprob then the loss (algo.fused_loss).
        self.fused_loss = uses_fused_loss(algo, optim.on_policy, self.device)
        # What a rank runs, its loss multiplied by zero, when others have more micro-batches than it.
        pad_id = getattr(tokenizer, "pad_token_id", None) or 0
        self.placeholder = MicroBatch.placeholder(pad_id, self.device)
        self.optimizer = torch.optim.AdamW(
            [p for p in self.policy.parameters() if p.requires_grad],
            lr=optim.lr,
            betas=(optim.beta1, optim.beta2),
            eps=optim.eps,
            weight_decay=optim.weight_decay,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_multiplier(optim, total_optimizer_steps))

    @staticmethod
    def _prepare(policy: ResponseLogprobs, mesh, sharding: ShardingConfig) -> ResponseLogprobs:
        return policy if mesh is None else shard_policy(policy, mesh, sharding)

    def _passes(self, micro_batches: list[MicroBatch]) -> list[MicroBatch | None]:
        """`micro_batches`, then None (a placeholder pass) up to the most any rank has, so that
        every rank joins each sharded forward/backward; in one process, the list itself."""
        most = self.dist.max_int(len(micro_batches))
        return list(micro_batches) + [None] * (most - len(micro_batches))

    # -- the update ------------------------------------------------------------------------------

    @torch.no_grad()
    def _fixed_logprobs(self, batch: TrainBatch, on_policy: bool) -> tuple[list[list[FixedLogprobs]], FixedLogprobs]:
        """The fixed log-probs of every micro-batch, by mini-batch as `batch.mini_batches` holds
        them (old: unless on-policy, the sampler's when the batch says so; ref: with a KL term),
        and the placeholder's."""
        impl, temperature = self.algo.logprob_impl, batch.temperature
        sampler = batch.behaviour == "sampler"
        if (on_policy or sampler) and self.ref_policy is None:
            given = iter(FixedLogprobs(mb.sampler_logprobs if sampler else None) for mb in batch.micro_batches)
            return [[next(given) for _ in mini] for mini in batch.mini_batches], FixedLogprobs()

        def of(policy, mb):
            return policy.of(mb, temperature=temperature, with_entropy=False, impl=impl)[0]

        fixed = []
        for mb in self._passes(batch.micro_batches):
            step = mb if mb is not None else self.placeholder
            old = None if on_policy else (step.sampler_logprobs if sampler else of(self.policy, step))
            ref = None if self.ref_policy is None else of(self.ref_policy, step)
            if mb is not None:
                fixed.append(FixedLogprobs(old, ref))
        # The placeholder's loss pass needs reference log-probs when there is a KL term, and old
        # ones off-policy (the fused pass weighs a rollout correction by them before it runs); any
        # of the right shape do, as its loss is multiplied by zero.
        zeros = torch.zeros_like(self.placeholder.sampler_logprobs)
        placeholder = FixedLogprobs(None if on_policy else zeros, None if self.ref_policy is None else zeros)
        in_order = iter(fixed)
        return [[next(in_order) for _ in mini] for mini in batch.mini_batches], placeholder

    def update(self, batch: TrainBatch) -> dict[str, float]:
        oc, algo = self.optim_config, self.algo
        # Strictly on-policy: the old log-probs come from the update's own forward.
        on_policy = oc.on_policy and batch.behaviour == "current"
        fixed_by_mini, placeholder_fixed = self._fixed_logprobs(batch, on_policy)

        def loss_of(mb: MicroBatch, f: FixedLogprobs):
            return micro_batch_loss(
                self.policy,
                mb,
                algo,
                f,
                temperature=batch.temperature,
                max_response_tokens=batch.max_response_tokens,
                fused=self.fused_loss,
            )

        self.policy.train()
        metrics = UpdateMetrics()
        grad_norms = []
        for _ in range(oc.ppo_epochs):
            for mini, mini_fixed in zip(batch.mini_batches, fixed_by_mini):
                total_tokens, total_seqs = self.dist.sum_floats(
                    [sum(mb.num_model_tokens for mb in mini), sum(mb.num_seqs for mb in mini)]
                )
                self.optimizer.zero_grad(set_to_none=True)
                for i, mb in enumerate(self._passes(mini)):
                    if mb is None:  # this rank has fewer micro-batches: a pass that adds nothing
                        loss, m = loss_of(self.placeholder, placeholder_fixed)
                        (loss * 0.0).backward()
                        metrics.expect(["actor/loss", *("actor/" + k for k in m)])
                        continue
                    loss, m = loss_of(mb, mini_fixed[i])
                    w = micro_batch_weight(
                        algo.aggregation,
                        tokens=mb.num_model_tokens,
                        seqs=mb.num_seqs,
                        total_tokens=int(total_tokens),
                        total_seqs=int(total_seqs),
                        world_size=self.dist.world_size,
                    )
                    (loss * w).backward()
                    metrics.add(
                        {"actor/loss": loss.detach(), **{"actor/" + k: v for k, v in m.items()}},
                        weight=mb.num_model_tokens,
                    )
                grad_norms.append(self._optimizer_step())
        self.policy.eval()
        out = metrics.reduce(self.dist)
        out["actor/grad_norm"] = float(np.mean(grad_norms)) if grad_norms else 0.0  # the same on every rank
        local_mean = float(batch.advantages.abs().mean()) if batch.num_trajectories else 0.0
        out |= self.dist.mean_metrics({"actor/advantage_abs_mean": local_mean}, weight=batch.num_trajectories)
        # The share of the forwards' input slots that held padding, not tokens (0 when packed):
        # slot counts summed over ranks before dividing, so it is the job's share.
        padding, slots = self.dist.sum_floats(
            [
                sum(mb.num_padding_slots for mb in batch.micro_batches),
                sum(mb.num_input_slots for mb in batch.micro_batches),
            ]
        )
        out["actor/padding_share"] = padding / slots if slots else 0.0
        out["actor/lr"] = self.scheduler.get_last_lr()[0]
        return out

    def _optimizer_step(self) -> float:
        """Clip the gradient to `optim.grad_clip` (0: no clipping), step unless its norm is not
        finite, advance the schedule; return the norm before clipping."""
        clip = self.optim_config.grad_clip
        norm = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), clip if clip > 0 else float("inf"))
        norm = float(full_tensor(norm))  # sharded: a DTensor, the same on every rank once whole
        if math.isfinite(norm):
            self.optimizer.step()
        else:
            print("[cir] non-finite grad norm, optimizer step skipped", file=sys.stderr, flush=True)
        self.scheduler.step()
        return norm

    # -- state and weights -----------------------------------------------------------------------

    def save_sharded_state(self, path: Path) -> dict:
        """Write the optimizer's state under `path` (every rank its own shard: a collective) and
        return what is the same on every rank (the LR scheduler's state).

        The weights are not in it: the Hugging Face export holds them in their own dtype, and a
        resumed run loads them from there. The state dict is keyed by parameter name, not by
        position or shard, which is what lets a different number of ranks load it."""
        with _single_process_notice_off():
            dcp.save(
                {"optimizer": get_optimizer_state_dict(self.policy, self.optimizer)},
                checkpoint_id=str(path),
                no_dist=self.dist.world_size == 1,
            )
        return {"scheduler": self.scheduler.state_dict()}

    def load_sharded_state(self, path: Path, state: dict) -> None:
        """Read back what `save_sharded_state` wrote, resharded to this run's ranks."""
        # The optimizer's state, shaped (and sharded) as this run holds it, to be filled in place.
        optimizer = get_optimizer_state_dict(self.policy, self.optimizer)
        holder = {"optimizer": optimizer}
        with _single_process_notice_off():
            dcp.load(holder, checkpoint_id=str(path), no_dist=self.dist.world_size == 1)
        set_optimizer_state_dict(self.policy, self.optimizer, holder["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    def save_pretrained(self, path: Path | None) -> None:
        """The policy as a Hugging Face folder at `path`; every rank calls it (the weights are
        gathered tensor by tensor), the one given a `path` (rank 0) writes, the others pass None
        and keep nothing. No rank holds a second copy of the model in host memory."""
        names = export.saved_names(self.model)
        export.save_pretrained(self.model, self._full_tensors(names), path, names, self.tokenizer)

    def _full_tensors(self, names: Iterable[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """(Hugging Face name, whole tensor) for every entry of the policy's state dict (or those
        in `names`), one at a time: a sharded one is gathered as it is reached."""
        wanted = None if names is None else set(names)
        for name, tensor in self.model.state_dict(keep_vars=False).items():
            if wanted is None or name in wanted:
                yield name, full_tensor(tensor)

    def iter_weights(self, bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> Iterator[NamedTensors]:
        """Buckets of (Hugging Face name, full tensor), tied weights under each of their names.
        The tensors may be the live parameters (no copy): a consumer copies what it keeps."""
        bucket: NamedTensors = []
        size = 0
        for name, tensor in self._full_tensors():
            bucket.append((name, tensor))
            size += tensor.numel() * tensor.element_size()
            if size >= bucket_bytes:
                yield bucket
                bucket, size = [], 0
        if bucket:
            yield bucket


@contextlib.contextmanager
def _single_process_notice_off():
    """DCP warns that it "assumes a single process" whenever no process group exists, even when
    asked for exactly that (`no_dist=True`); a one-process run would print it at every save."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _frozen(model):
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def _frozen_copy(model):
    return _frozen(copy.deepcopy(model))
