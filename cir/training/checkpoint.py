"""Checkpoints that `transformers` (and vLLM) load, plus everything needed to resume exactly,
on the same or on a different number of ranks.

Layout of ``<out_dir>/checkpoints/step_000040/``:

- ``model.safetensors`` + ``config.json`` + ``generation_config.json``: the policy in the
  Hugging Face layout (``AutoModelForCausalLM.from_pretrained(dir)`` loads it), written by rank
  0 in the parameters' own dtype, so it is also the exact weights a resumed run starts from;
- tokenizer files (``tokenizer.json`` ...);
- ``optimizer/``: the optimizer state (AdamW moments and step counts) as a sharded
  ``torch.distributed.checkpoint``: each rank writes only its own shard, and any number of
  ranks reads it back (DCP reshards on load), one process included;
- ``trainer_state.pt``: the LR scheduler, the RNG states of every rank (python, numpy,
  torch), the problem sampler's position, the step, and any extra state the trainer adds.

A checkpoint is written to a temporary folder and renamed into place, so a crash while
saving never leaves a half-written checkpoint that ``--resume`` would pick up. With several
nodes, ``run.out_dir`` must be a filesystem every node sees (each rank writes its shard there).
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cir.distributed import DistributedContext

STATE_FILE = "trainer_state.pt"
OPTIMIZER_DIR = "optimizer"


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_dir(out_dir: str | Path, step: int) -> Path:
    return Path(out_dir) / "checkpoints" / f"step_{step:06d}"


def save_checkpoint(
    out_dir: str | Path,
    step: int,
    actor,
    dist: DistributedContext,
    extra: dict[str, Any] | None = None,
    keep: int | None = None,
) -> Path:
    """Save step `step` of `actor` under `out_dir/checkpoints/`; keep only the newest `keep`
    (None: all). Every rank calls this: gathering the weights and writing the optimizer's
    shards are collectives. Rank 0 writes everything else."""
    final = checkpoint_dir(out_dir, step)
    tmp = final.with_name(final.name + ".tmp")
    if dist.is_main:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    dist.barrier()  # the folder exists (and no stale one) before any rank writes into it
    actor.save_pretrained(tmp if dist.is_main else None)
    replicated = actor.save_sharded_state(tmp / OPTIMIZER_DIR)
    rng = dist.gather_to_main(rng_state())
    if not dist.is_main:
        return final
    state = {"step": step, **replicated, "rng": rng, "world_size": dist.world_size, "extra": extra or {}}
    torch.save(state, tmp / STATE_FILE)
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    (Path(out_dir) / "checkpoints" / "latest").write_text(final.name + "\n")
    if keep is not None and keep > 0:
        for old in list_checkpoints(out_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def restore_rng(state: dict[str, Any], dist: DistributedContext) -> None:
    """This rank's RNG states as saved. A rank the saving run did not have keeps the states it
    was seeded with: sampling seeds never come from these generators, so only rank-local
    randomness (e.g. dropout) differs from an uninterrupted run on a different world size."""
    saved = state["rng"]
    if dist.rank < len(saved):
        set_rng_state(saved[dist.rank])


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    root = Path(out_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [
        p
        for p in root.iterdir()
        if p.is_dir() and p.name.startswith("step_") and not p.name.endswith(".tmp") and (p / STATE_FILE).is_file()
    ]
    return sorted(found, key=lambda p: int(p.name.split("_")[1]))


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    found = list_checkpoints(out_dir)
    return found[-1] if found else None


def why_not_resumable(ckpt: str | Path) -> str | None:
    """Why `ckpt` cannot be resumed from (None: it can)."""
    ckpt = Path(ckpt)
    if not (ckpt / STATE_FILE).is_file():
        return f"{ckpt} is not a cir checkpoint (no {STATE_FILE})"
    if not (ckpt / OPTIMIZER_DIR / ".metadata").is_file():
        return (
            f"{ckpt} has no {OPTIMIZER_DIR}/ (the optimizer's sharded state): it was written by an older cir or is "
            "incomplete; its Hugging Face folder still loads as model.path"
        )
    return None


def load_trainer_state(ckpt: str | Path) -> dict[str, Any]:
    problem = why_not_resumable(ckpt)
    if problem is not None:
        raise FileNotFoundError(problem)
    # The state holds numpy RNG arrays and python tuples, so the full unpickler is needed;
    # it is our own file, written by save_checkpoint.
    return torch.load(Path(ckpt) / STATE_FILE, map_location="cpu", weights_only=False)
