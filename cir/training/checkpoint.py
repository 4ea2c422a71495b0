"""Checkpoints that `transformers` (and vLLM) load, plus everything needed to resume exactly.

Layout of ``<out_dir>/checkpoints/step_000040/``:

- ``model.safetensors`` + ``config.json`` + ``generation_config.json``: the policy in the
  Hugging Face layout (``AutoModelForCausalLM.from_pretrained(dir)`` loads it);
- tokenizer files (``tokenizer.json`` ...);
- ``trainer_state.pt``: the actor's state (optimizer and LR scheduler), RNG states (python,
  numpy, torch), the problem sampler's position, the step, and any extra state the trainer adds.

A checkpoint is written to a temporary folder and renamed into place, so a crash while
saving never leaves a half-written checkpoint that ``--resume`` would pick up.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

STATE_FILE = "trainer_state.pt"


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
    extra: dict[str, Any] | None = None,
    keep: int | None = None,
    write: bool = True,
) -> Path:
    """Save step `step` of `actor` (its Hugging Face folder and its optimizer and scheduler
    state) under `out_dir/checkpoints/`; keep only the newest `keep` (None: all).

    With several ranks every rank calls this (gathering the actor's state is a collective) and
    only the one with `write=True` writes."""
    final = checkpoint_dir(out_dir, step)
    tmp = final.with_name(final.name + ".tmp")
    if write:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    actor.save_pretrained(tmp if write else None)
    state = actor.state_dict()
    if not write:
        return final
    torch.save({"step": step, **state, "rng": rng_state(), "extra": extra or {}}, tmp / STATE_FILE)
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    (Path(out_dir) / "checkpoints" / "latest").write_text(final.name + "\n")
    if keep is not None and keep > 0:
        for old in list_checkpoints(out_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


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


def load_trainer_state(ckpt: str | Path) -> dict[str, Any]:
    path = Path(ckpt) / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{ckpt} is not a cir checkpoint (no {STATE_FILE})")
    # The state holds numpy RNG arrays and python tuples, so the full unpickler is needed;
    # it is our own file, written by save_checkpoint.
    return torch.load(path, map_location="cpu", weights_only=False)
