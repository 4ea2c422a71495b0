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

A checkpoint is written to a temporary folder, every file and folder of it synced to disk, and
renamed into place (the rename synced too), so a crash or a power cut while saving never leaves
a half-written checkpoint under its final name. Should one be found anyway (a filesystem that
lost data), ``--resume`` skips a newest checkpoint whose files are missing or cut short for the
one before, with a message (`latest_checkpoint`, `why_not_resumable`). With several nodes,
``run.out_dir`` must be a filesystem every node sees (each rank writes its shard there).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cir.distributed import DistributedContext

STATE_FILE = "trainer_state.pt"
OPTIMIZER_DIR = "optimizer"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"  # the weights in several files (large models)


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
    # On disk before it takes its name: without it, a power cut can leave the renamed folder with
    # empty or missing files (the rename reaches the disk before the data).
    fsync_tree(tmp)
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    fsync_dir(final.parent)
    latest, latest_tmp = final.parent / "latest", final.parent / "latest.tmp"
    with open(latest_tmp, "w") as f:
        f.write(final.name + "\n")
        f.flush()
        os.fsync(f.fileno())
    latest_tmp.replace(latest)
    fsync_dir(final.parent)
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


def fsync_dir(path: Path) -> None:
    """Sync a folder's entries (the names of what was created or renamed in it) to disk."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """Sync every file under `root` to disk, then every folder (deepest first), `root` last."""
    for folder, _, files in os.walk(root, topdown=False):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(folder))


def _say_on_rank_zero(message: str) -> None:
    if int(os.environ.get("RANK", "0")) == 0:  # every rank of a torchrun job looks; one tells
        print(f"[cir] {message}", file=sys.stderr, flush=True)


def latest_checkpoint(out_dir: str | Path, say: Callable[[str], None] = _say_on_rank_zero) -> Path | None:
    """The newest checkpoint under `out_dir` that can be resumed from. A newer one that cannot
    (`why_not_resumable`: its weights or state missing or cut short by a hard stop) is skipped
    for the one before, with a message through `say`. None when there is none."""
    for path in reversed(list_checkpoints(out_dir)):
        problem = why_not_resumable(path)
        if problem is None:
            return path
        say(f"skipping {problem}; trying the checkpoint before it")
    return None


def why_not_resumable(ckpt: str | Path) -> str | None:
    """Why `ckpt` cannot be resumed from (None: it can): a file missing, or cut short (its size
    is not the one its own header or index records)."""
    ckpt = Path(ckpt)
    if not (ckpt / STATE_FILE).is_file():
        return f"{ckpt} is not a cir checkpoint (no {STATE_FILE})"
    if not (ckpt / OPTIMIZER_DIR / ".metadata").is_file():
        return (
            f"{ckpt} has no {OPTIMIZER_DIR}/ (the optimizer's sharded state): it was written by an older cir or is "
            "incomplete; its Hugging Face folder still loads as model.path"
        )
    problem = _weights_problem(ckpt) or _state_problem(ckpt / STATE_FILE) or _optimizer_problem(ckpt / OPTIMIZER_DIR)
    return None if problem is None else f"{ckpt}: {problem}"


def _weights_problem(ckpt: Path) -> str | None:
    if not (ckpt / "config.json").is_file():
        return "no config.json (the policy's Hugging Face folder is incomplete)"
    if (ckpt / WEIGHTS_INDEX).is_file():
        try:
            files = sorted(set(json.loads((ckpt / WEIGHTS_INDEX).read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError) as e:
            return f"{WEIGHTS_INDEX} is unreadable ({e})"
    elif (ckpt / WEIGHTS_FILE).is_file():
        files = [WEIGHTS_FILE]
    else:
        return f"no {WEIGHTS_FILE} (the policy's weights are missing)"
    for name in files:
        problem = _safetensors_problem(ckpt / name)
        if problem is not None:
            return f"{name} {problem}"
    return None


def _safetensors_problem(path: Path) -> str | None:
    """None when `path` is a whole safetensors file: 8 bytes of header length, the JSON header,
    then exactly the tensor bytes the header's offsets cover."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            header_len = int.from_bytes(head, "little") if len(head) == 8 else -1
            if not 0 <= header_len <= size - 8:
                return f"is cut short ({size} bytes, not even its header)"
            header = json.loads(f.read(header_len))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except FileNotFoundError:
        return "is missing"
    except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
        return f"is unreadable ({e})"
    if size != 8 + header_len + end:
        return f"is cut short ({size} of {8 + header_len + end} bytes)"
    return None


def _state_problem(path: Path) -> str | None:
    # torch.save writes a zip, whose directory is at the very end: a cut-off file has none.
    try:
        with zipfile.ZipFile(path) as z:
            z.infolist()
    except (OSError, zipfile.BadZipFile) as e:
        return f"{STATE_FILE} is unreadable or cut short ({e})"
    return None


def _optimizer_problem(folder: Path) -> str | None:
    """Every shard file as long as the offsets in the sharded checkpoint's metadata require."""
    from torch.distributed.checkpoint import FileSystemReader

    try:
        storage = FileSystemReader(str(folder)).read_metadata().storage_data or {}
        needed: dict[str, int] = {}
        for info in storage.values():
            needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    except Exception as e:  # a torn .metadata: pickle and torch raise many kinds
        return f"{OPTIMIZER_DIR}/.metadata is unreadable ({type(e).__name__}: {e})"
    for name, length in sorted(needed.items()):
        path = folder / name
        size = path.stat().st_size if path.is_file() else -1
        if size < length:
            return f"{OPTIMIZER_DIR}/{name} is " + ("missing" if size < 0 else f"cut short ({size} of {length} bytes)")
    return None


def load_trainer_state(ckpt: str | Path) -> dict[str, Any]:
    problem = why_not_resumable(ckpt)
    if problem is not None:
        raise FileNotFoundError(problem)
    # The state holds numpy RNG arrays and python tuples, so the full unpickler is needed;
    # it is our own file, written by save_checkpoint.
    return torch.load(Path(ckpt) / STATE_FILE, map_location="cpu", weights_only=False)
