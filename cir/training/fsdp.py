"""`FSDPActor`: the actor sharded over ranks with FSDP2 (`fully_shard`), the same interface as
`LocalActor`.

Launched by `torchrun`, every rank holds a shard of each decoder layer and of the root (the
embeddings, final norm and LM head). What differs from one process, and why:

- The log-prob kernel reads the LM-head weight inside the root's forward (`ResponseLogprobs`
  is the root FSDP module): outside a forward each rank holds only a shard of it.
- Every rank runs the same number of forward/backward passes (each one all-gathers
  parameters): a rank with fewer micro-batches (or none: dynamic sampling may keep no group
  of its shard) runs placeholder passes whose loss is multiplied by zero (`_padded_plan`).
- Gradients are averaged over ranks by FSDP's reduce-scatter; micro-batch weights carry a
  `world_size` factor (`cir.algorithms.micro_batch_weight`), so the result is the gradient
  of the global batch's loss.
- Weights leave as whole tensors (`full_tensor()`, a collective: every rank iterates). The
  optimizer's state needs nothing here: `LocalActor`'s sharded checkpoint (DCP) writes each
  rank's DTensor shards and reshards them on load.
- Mixed precision on CUDA: bf16 compute, fp32 master weights and fp32 gradient reduction.
  On CPU (gloo) everything stays fp32.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from cir.training.actor import LocalActor
from cir.training.batch import MicroBatch
from cir.training.logprobs import ResponseLogprobs


def decoder_layers(lm: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks of a `transformers` decoder-only model (each becomes one FSDP unit)."""
    decoder = lm.get_decoder() if hasattr(lm, "get_decoder") else lm.base_model
    layers = getattr(decoder, "layers", None)
    if layers is None:
        raise ValueError(f"{type(lm).__name__}: no decoder `layers` to shard")
    return list(layers)


class FSDPActor(LocalActor):
    def _wrap(self, policy: ResponseLogprobs) -> ResponseLogprobs:
        mp = None
        # The model may still be on the CPU: fully_shard moves each unit's parameters to the GPU
        # as it shards them.
        if self.dist.device == "cuda":
            mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        kwargs = {} if mp is None else {"mp_policy": mp}
        for layer in decoder_layers(policy.lm):
            fully_shard(layer, **kwargs)
        fully_shard(policy, **kwargs)
        return policy

    def _padded_plan(self, micro_batches: list[MicroBatch]) -> list[MicroBatch | None]:
        """This rank's micro-batches, then None (a placeholder pass) up to the most any rank has;
        a rank with no trajectories this step runs placeholders only."""
        most = self.dist.max_int(len(micro_batches))
        return list(micro_batches) + [None] * (most - len(micro_batches))

    def _grad_norm(self) -> float:
        clip = self.optim_config.grad_clip
        norm = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), clip if clip > 0 else float("inf"))
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        return float(norm)

    def _full_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in self.model.state_dict().items():
            yield name, tensor.full_tensor() if isinstance(tensor, DTensor) else tensor

    def save_pretrained(self, path: Path | None) -> None:
        """Every rank gathers; the rank given a `path` (rank 0) writes the Hugging Face folder."""
        full = {name: tensor.detach().cpu() for name, tensor in self._full_tensors()}
        if path is None:
            return
        # Gathered tied weights are separate tensors: keep only the one the model saves itself.
        if getattr(self.model.config, "tie_word_embeddings", False):
            for tied in getattr(self.model, "_tied_weights_keys", None) or {}:
                full.pop(tied, None)
        self.model.save_pretrained(path, state_dict=full, safe_serialization=True)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(path)
