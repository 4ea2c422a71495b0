"""Sharding the actor's model with FSDP2: a function applied when the actor is built, not a kind
of actor. The training step is the same code for one process and for many.

When (`should_shard`): with several ranks, always; in one process on CUDA as well, over a group
of one, so that a single GPU computes as many do (bf16 compute, fp32 master weights); one CPU
process trains the plain module (the demo's numbers do not depend on FSDP).

How (`shard_policy`): `fully_shard` on every decoder layer (one all-gather per layer in the
forward, one reduce-scatter in the backward) and on the root, the module the actor calls
(`ResponseLogprobs`: the embeddings, final norm and LM head; the fused log-prob kernel reads the
LM-head weight inside the root's forward, the only place where it is whole). On a mesh of
[replicate, shard] ranks (`sharding.replicate` > 1) that is HSDP: parameters sharded within a
replica, gradients averaged across replicas as well. On CUDA with `sharding.compute_dtype=
bfloat16`, each pass computes in bf16 while parameters and optimizer state stay in model.dtype
and gradients are reduced in fp32; on the CPU everything stays in model.dtype.

What the rest of the actor sees: parameters are DTensors (a shard per rank), so a whole tensor
is `full_tensor(t)` (a collective: every rank asks for it), and each forward/backward is a
collective, so every rank runs as many of them (the actor's placeholder passes).
"""

from __future__ import annotations

import torch
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from cir.config_loader import ConfigError
from cir.training.logprobs import ResponseLogprobs
from cir.training.optim import ShardingConfig, actor_compute_dtype


def should_shard(world_size: int, device_type: str) -> bool:
    """Shard over several ranks, and over a group of one on CUDA (FSDP2's mixed precision is how
    the actor computes on a GPU); one CPU process keeps the plain module."""
    return world_size > 1 or device_type == "cuda"


def mixed_precision(cfg: ShardingConfig, device_type: str) -> MixedPrecisionPolicy:
    """bf16 compute with fp32 gradient reduction on CUDA (unless `compute_dtype=float32`); the
    parameters' own dtype everywhere on the CPU."""
    if device_type != "cuda":
        return MixedPrecisionPolicy()
    compute = torch.bfloat16 if cfg.compute_dtype == "bfloat16" else None
    return MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32)


def device_mesh(cfg: ShardingConfig, world_size: int, device_type: str) -> DeviceMesh:
    """The ranks as a 1-D mesh ("shard": FSDP) or, with `sharding.replicate` > 1, a 2-D one
    ("replicate" x "shard": HSDP). Consecutive ranks share a replica, so with one replica per
    node the shard dimension stays within a node."""
    if world_size % cfg.replicate:
        raise ConfigError(f"sharding.replicate={cfg.replicate} does not divide the number of ranks ({world_size})")
    if not torch.distributed.is_initialized():
        if world_size != 1:
            raise RuntimeError(f"a mesh of {world_size} ranks needs torch.distributed initialised (torchrun)")
        # One process (on a GPU): a group of one, over an in-memory store (no rendezvous, no port).
        backend = "nccl" if device_type == "cuda" else "gloo"
        torch.distributed.init_process_group(backend, store=torch.distributed.HashStore(), rank=0, world_size=1)
    if cfg.replicate == 1:
        return init_device_mesh(device_type, (world_size,), mesh_dim_names=("shard",))
    return init_device_mesh(
        device_type, (cfg.replicate, world_size // cfg.replicate), mesh_dim_names=("replicate", "shard")
    )


def decoder_layers(lm: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks of a `transformers` decoder-only model (each becomes one FSDP unit)."""
    decoder = lm.get_decoder() if hasattr(lm, "get_decoder") else lm.base_model
    layers = getattr(decoder, "layers", None)
    if layers is None:
        raise ValueError(f"{type(lm).__name__}: no decoder `layers` to shard")
    return list(layers)


def shard_policy(policy: ResponseLogprobs, mesh: DeviceMesh, cfg: ShardingConfig) -> ResponseLogprobs:
    """Shard `policy` in place over `mesh`: each decoder layer, then the root. The model may
    still be on the CPU: each unit's parameters move to the mesh's device as it is sharded, so
    no rank ever holds the whole model there."""
    mp = mixed_precision(cfg, mesh.device_type)
    for layer in decoder_layers(policy.lm):
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    fully_shard(policy, mesh=mesh, mp_policy=mp)
    return policy


def compute_dtype(model: torch.nn.Module, cfg: ShardingConfig, device_type: str, sharded: bool) -> torch.dtype:
    """The dtype the forward and backward of `model` run in once the actor has built it (the rule
    the config checks at load, `actor_compute_dtype`, applied to the model at hand)."""
    param = next(model.parameters()).dtype
    if not sharded:
        return param
    return getattr(torch, actor_compute_dtype(str(param).removeprefix("torch."), cfg, device_type))


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole of `tensor`: all-gathered from its shards if it is a DTensor (a collective),
    else itself."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
