"""The actor: the one owner of the policy's weights, optimizer and learning-rate schedule.

Everything the trainer does with the policy goes through this interface:

- `update(batch)`: old and reference log-probs where needed, then the masked clipped loss over
  micro-batches and one optimizer step per mini-batch (per PPO epoch); returns metrics;
- `save_sharded_state(path)` / `load_sharded_state(path, state)`: the optimizer's state as a
  sharded `torch.distributed.checkpoint` (each rank its shard; any number of ranks reads it
  back), plus the small replicated rest (the LR scheduler) for the trainer's state file;
- `save_pretrained(path)`: the policy as a Hugging Face folder;
- `iter_weights(bucket_bytes)`: the only way weights leave the trainer, as buckets of full
  tensors under Hugging Face names; `sync_weights(actor, engine)` hands them to an engine.

`LocalActor` is the single-process implementation. A sharded (FSDP2) actor implements the same
methods; the trainer cannot tell them apart.
"""

from __future__ import annotations

import contextlib
import copy
import math
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

from cir.algorithms import AlgoConfig, compute_policy_loss, micro_batch_weight
from cir.algorithms.correction import importance_weights, mismatch_metrics
from cir.distributed import DistributedContext
from cir.training.batch import MicroBatch, TrainBatch
from cir.training.logprobs import ResponseLogprobs
from cir.training.optim import OptimConfig, lr_multiplier

NamedTensors = list[tuple[str, torch.Tensor]]

# Weights leave the actor in buckets of about this many bytes (a bounded staging cost per
# hand-off, however large the model).
DEFAULT_BUCKET_BYTES = 256 << 20


class Actor(Protocol):
    tokenizer: object

    def update(self, batch: TrainBatch) -> dict[str, float]: ...

    def save_sharded_state(self, path: Path) -> dict: ...

    def load_sharded_state(self, path: Path, state: dict) -> None: ...

    def save_pretrained(self, path: Path) -> None: ...

    def iter_weights(self, bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> Iterator[NamedTensors]: ...


def sync_weights(actor: Actor, engine, bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> None:
    """Hand the actor's current weights to `engine`, one bucket at a time."""
    for bucket in actor.iter_weights(bucket_bytes):
        engine.load_weights(bucket)


def micro_batch_loss(
    policy: ResponseLogprobs, mb: MicroBatch, algo: AlgoConfig, *, temperature: float, max_response_tokens: int
):
    """Loss (self-normalised over `mb`) and metrics of one micro-batch, with gradient."""
    logprob, entropy = policy.of(mb, temperature=temperature, with_entropy=True, impl=algo.logprob_impl)
    old = mb.old_logprobs if mb.old_logprobs is not None else logprob.detach()
    advantages = mb.advantages
    weights = importance_weights(
        old,
        mb.sampler_logprobs,
        mb.loss_mask,
        mb.cu_seqlens,
        mode=algo.rollout_correction,
        cap=algo.rollout_correction_cap,
    )
    if weights is not None:  # per-token advantages carry the sampler/trainer correction
        lengths = mb.cu_seqlens[1:] - mb.cu_seqlens[:-1]
        advantages = torch.repeat_interleave(mb.advantages, lengths) * weights
    loss, metrics = compute_policy_loss(
        algo.policy_loss,
        logprob,
        old,
        advantages,
        mb.loss_mask,
        clip_low=algo.clip_low,
        clip_high=algo.clip_high,
        dual_clip=algo.dual_clip,
        aggregation=algo.aggregation,
        ref_logprob=mb.ref_logprobs,
        kl_coef=algo.kl_coef,
        kl_type=algo.kl_type,
        kl_cap=algo.kl_cap,
        entropy=entropy,
        entropy_coef=algo.entropy_coef,
        cu_seqlens=mb.cu_seqlens,
        max_seq_len_norm=max_response_tokens,
        impl=algo.loss_impl,
    )
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


class LocalActor:
    """The policy in this process (CPU or one GPU).

    `total_optimizer_steps` sets the length of the LR schedule's decay. With `algo.kl_coef > 0`
    a frozen copy of the initial policy serves as the KL reference. `FSDPActor` (cir.training.fsdp)
    overrides the few methods where sharding matters.
    """

    def __init__(
        self,
        model,
        tokenizer,
        optim: OptimConfig,
        algo: AlgoConfig,
        *,
        total_optimizer_steps: int,
        dist: DistributedContext | None = None,
        reference=None,
    ):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.optim_config = optim
        self.algo = algo
        self.dist = dist or DistributedContext()
        ref = None
        if algo.kl_coef > 0:  # the KL reference: `reference` if given, else the policy as it starts
            ref = _frozen_copy(model) if reference is None else _frozen(reference)
        self.policy = self._wrap(ResponseLogprobs(model))
        self.ref_policy = None if ref is None else self._wrap(ResponseLogprobs(ref))
        self.optimizer = torch.optim.AdamW(
            [p for p in self.policy.parameters() if p.requires_grad],
            lr=optim.lr,
            betas=(optim.beta1, optim.beta2),
            eps=optim.eps,
            weight_decay=optim.weight_decay,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_multiplier(optim, total_optimizer_steps))

    def _wrap(self, policy: ResponseLogprobs) -> ResponseLogprobs:
        """Where a sharded actor shards the module; here the module is used as it is."""
        return policy

    def _padded_plan(self, micro_batches: list[MicroBatch]) -> list[MicroBatch | None]:
        """The micro-batches to run; a sharded actor pads with None so every rank runs as many."""
        return list(micro_batches)

    # -- the update ------------------------------------------------------------------------------

    @torch.no_grad()
    def _fill_old_and_ref_logprobs(self, batch: TrainBatch, on_policy: bool) -> None:
        impl = self.algo.logprob_impl
        for mb in self._padded_plan(batch.micro_batches):
            step = mb if mb is not None else batch.placeholder  # a padding pass: result unused
            if not on_policy:
                lp = self.policy.of(step, temperature=batch.temperature, with_entropy=False, impl=impl)[0]
                if mb is not None:
                    mb.old_logprobs = lp
            if self.ref_policy is not None:
                lp = self.ref_policy.of(step, temperature=batch.temperature, with_entropy=False, impl=impl)[0]
                if mb is not None:
                    mb.ref_logprobs = lp

    def update(self, batch: TrainBatch) -> dict[str, float]:
        oc, algo = self.optim_config, self.algo
        # Strictly on-policy (one epoch, one mini-batch): the old policy is the current one, so
        # its log-probs come from the same forward (ratio exactly 1) and need no extra pass.
        on_policy = oc.ppo_epochs == 1 and oc.mini_batches == 1
        if not on_policy or self.ref_policy is not None:
            self._fill_old_and_ref_logprobs(batch, on_policy)
        self.policy.train()
        sums: dict[str, float] = {}
        maxima: dict[str, float] = {}  # metrics that are a maximum over tokens, not a mean
        weight_total = 0.0
        grad_norms = []
        for _ in range(oc.ppo_epochs):
            for mini in batch.mini_batches:
                total_tokens, total_seqs = self.dist.sum_floats(
                    [sum(mb.num_model_tokens for mb in mini), sum(mb.num_seqs for mb in mini)]
                )
                self.optimizer.zero_grad(set_to_none=True)
                for mb in self._padded_plan(mini):
                    if mb is None:  # this rank has fewer micro-batches: a pass that adds nothing
                        loss, m = micro_batch_loss(
                            self.policy,
                            batch.placeholder,
                            algo,
                            temperature=batch.temperature,
                            max_response_tokens=batch.max_response_tokens,
                        )
                        (loss * 0.0).backward()
                        # The same metric keys as a rank with data, at weight 0 (reductions need them).
                        sums.setdefault("actor/loss", 0.0)
                        for k in m:
                            (maxima if k.endswith("_max") else sums).setdefault("actor/" + k, 0.0)
                        continue
                    loss, m = micro_batch_loss(
                        self.policy,
                        mb,
                        algo,
                        temperature=batch.temperature,
                        max_response_tokens=batch.max_response_tokens,
                    )
                    w = micro_batch_weight(
                        algo.aggregation,
                        tokens=mb.num_model_tokens,
                        seqs=mb.num_seqs,
                        total_tokens=int(total_tokens),
                        total_seqs=int(total_seqs),
                        world_size=self.dist.world_size,
                    )
                    (loss * w).backward()
                    tw = mb.num_model_tokens
                    weight_total += tw
                    sums["actor/loss"] = sums.get("actor/loss", 0.0) + float(loss.detach()) * tw
                    for k, v in m.items():
                        if k.endswith("_max"):
                            maxima["actor/" + k] = max(maxima.get("actor/" + k, 0.0), float(v))
                        else:
                            sums["actor/" + k] = sums.get("actor/" + k, 0.0) + float(v) * tw
                grad_norms.append(self._optimizer_step())
        self.policy.eval()
        # Sorted: the reductions pair values by position, and ranks may have met keys in another order.
        out = {k: sums[k] / max(weight_total, 1) for k in sorted(sums)}
        out = self.dist.mean_metrics(out, weight=weight_total)  # token-weighted over ranks
        out["actor/grad_norm"] = float(np.mean(grad_norms)) if grad_norms else 0.0  # the same on every rank
        out |= {k: self.dist.max_float(maxima[k]) for k in sorted(maxima)}
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

    def _grad_norm(self) -> float:
        """Clip the gradient to `optim.grad_clip` (0: no clipping) and return its norm before."""
        clip = self.optim_config.grad_clip
        return float(torch.nn.utils.clip_grad_norm_(self.policy.parameters(), clip if clip > 0 else float("inf")))

    def _optimizer_step(self) -> float:
        norm = self._grad_norm()
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
        """The policy as a Hugging Face folder at `path` (None: take part, write nothing)."""
        if path is None:
            return
        self.model.save_pretrained(path, safe_serialization=True)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(path)

    def _full_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(Hugging Face name, whole tensor) for every entry of the policy's state dict."""
        yield from self.model.state_dict(keep_vars=False).items()

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


def make_actor(
    model, tokenizer, optim: OptimConfig, algo: AlgoConfig, *, total_optimizer_steps: int, dist, reference=None
):
    """The actor for this process: `LocalActor` alone, `FSDPActor` (sharded) in a world of
    several ranks. `reference`: the KL reference model when it is not `model` as it starts
    (a resumed run's reference is the run's initial policy, not the checkpoint's)."""
    cls = LocalActor
    if dist is not None and dist.world_size > 1:
        from cir.training.fsdp import FSDPActor

        cls = FSDPActor
    return cls(
        model, tokenizer, optim, algo, total_optimizer_steps=total_optimizer_steps, dist=dist, reference=reference
    )
