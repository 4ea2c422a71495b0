"""Checkpoints on disk: synced before their rename, and a newest one cut short by a hard stop
(weights, trainer state or optimizer shards missing or torn) skipped for the one before."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from cir.algorithms.config import AlgoConfig
from cir.distributed import DistributedContext
from cir.models import tiny_causal_lm
from cir.tokenization import byte_tokenizer
from cir.training import checkpoint as ckpt
from cir.training.actor import Actor
from cir.training.optim import OptimConfig


@pytest.fixture(scope="module")
def actor():
    """A real actor on a tiny model, its AdamW moments filled by one step (so the optimizer's
    sharded state has tensors to write)."""
    tok = byte_tokenizer()
    model = tiny_causal_lm(tok, hidden_size=32, num_layers=1, num_heads=2, seed=0)
    actor = Actor(model, tok, OptimConfig(), AlgoConfig(), total_optimizer_steps=4, dist=DistributedContext())
    for p in actor.policy.parameters():
        p.grad = torch.zeros_like(p)
    actor.optimizer.step()
    return actor


def _save(out: Path, step: int, actor) -> Path:
    return ckpt.save_checkpoint(out, step, actor, DistributedContext(), extra={"sampler": {}})


def _cut(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_every_file_and_folder_is_synced_before_the_rename(tmp_path, actor, monkeypatch):
    synced: list[str] = []
    renamed: list[tuple[str, list[str]]] = []
    real_fsync, real_rename = os.fsync, Path.rename

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    def rename(self, target):
        renamed.append((str(target), list(synced)))
        return real_rename(self, target)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(Path, "rename", rename)
    final = _save(tmp_path, 3, actor)
    (synced_before,) = [was_synced for target, was_synced in renamed if target == str(final)]
    tmp = str(final) + ".tmp"
    on_disk = [tmp] + [
        os.path.join(tmp, os.path.relpath(os.path.join(d, n), final)) for d, ds, fs in os.walk(final) for n in ds + fs
    ]
    assert {"model.safetensors", "trainer_state.pt", "config.json"} <= set(os.listdir(final))
    missing = [p for p in on_disk if p not in synced_before]
    assert not missing, missing
    # The rename itself (an entry of checkpoints/) and the `latest` pointer are synced after it.
    after = synced[len(synced_before) :]
    assert str(final.parent) in after and (final.parent / "latest").read_text() == final.name + "\n"
    assert ckpt.why_not_resumable(final) is None


@pytest.mark.parametrize(
    "damage, reason",
    [
        (lambda c: (c / "model.safetensors").unlink(), "no model.safetensors"),
        (lambda c: _cut(c / "model.safetensors"), "model.safetensors is cut short"),
        (lambda c: (c / "model.safetensors").write_bytes(b""), "model.safetensors is cut short"),
        (lambda c: (c / "config.json").unlink(), "no config.json"),
        (lambda c: _cut(c / "trainer_state.pt", 0.9), "trainer_state.pt is unreadable or cut short"),
        (lambda c: _cut(next((c / "optimizer").glob("*.distcp"))), "is cut short"),
        (lambda c: _cut(c / "optimizer" / ".metadata"), "optimizer/.metadata is unreadable"),
    ],
)
def test_a_newest_checkpoint_cut_short_is_skipped_for_the_one_before(tmp_path, actor, damage, reason):
    first = _save(tmp_path, 1, actor)
    newest = _save(tmp_path, 2, actor)
    assert ckpt.latest_checkpoint(tmp_path) == newest
    damage(newest)
    problem = ckpt.why_not_resumable(newest)
    assert problem is not None and reason in problem, problem
    said: list[str] = []
    assert ckpt.latest_checkpoint(tmp_path, say=said.append) == first
    assert len(said) == 1 and str(newest) in said[0] and reason in said[0]
    # With nothing left to fall back on, there is no checkpoint to resume.
    shutil.rmtree(first)
    assert ckpt.latest_checkpoint(tmp_path, say=said.append) is None
