"""The policy as a Hugging Face folder, written from a stream of whole tensors.

`save_pretrained` writes `model.safetensors`, `config.json` and `generation_config.json` (what
`model.save_pretrained` writes for a model of one file) while the tensors arrive one at a time:
each is written as it comes and dropped, so the writer never holds the state dict, and ranks
that do not write take part in the gathers (each tensor may be a collective over sharded
parameters) without keeping anything. The safetensors header is known before any tensor is
gathered: names, dtypes and shapes come from the (possibly sharded) parameters themselves.

Tied weights (an LM head that is the input embedding) are one tensor under two names;
safetensors stores it once, under the name `transformers` loads it by, and loading re-ties it.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable
from pathlib import Path

import torch

SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}

WEIGHTS_NAME = "model.safetensors"


def saved_names(model: torch.nn.Module) -> list[str]:
    """The state dict's names, in order, with each tied alias dropped: of names that hold one
    tensor, the one `transformers` declares tied (`_tied_weights_keys`, e.g. `lm_head.weight`)
    goes, the first other one stays."""
    tied_targets = set(getattr(model, "_tied_weights_keys", None) or ())
    by_tensor: dict[int, list[str]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        by_tensor.setdefault(id(tensor), []).append(name)
    keep = set()
    for names in by_tensor.values():
        untied = [n for n in names if n not in tied_targets]
        keep.add(untied[0] if untied else names[0])
    return [name for name in model.state_dict(keep_vars=True) if name in keep]


def _header(model: torch.nn.Module, names: list[str]) -> bytes:
    """The safetensors header for `names` of `model`'s state dict, in that order: 8 bytes of
    length, then JSON padded with spaces to a multiple of 8 (the format's alignment)."""
    state = model.state_dict(keep_vars=True)
    entries: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in names:
        tensor = state[name]  # a DTensor reports the whole tensor's shape
        if tensor.dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"{name}: dtype {tensor.dtype} has no safetensors code here")
        size = tensor.numel() * tensor.element_size()
        entries[name] = {
            "dtype": SAFETENSORS_DTYPES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    text = json.dumps(entries, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def save_pretrained(
    model, tensors: Iterable[tuple[str, torch.Tensor]], path: Path | None, names: list[str], tokenizer=None
) -> None:
    """Write `model` (a `transformers` PreTrainedModel) as a Hugging Face folder at `path`, its
    weights taken from `tensors`: (name, whole tensor) for exactly `names`, in that order
    (`saved_names(model)`). With `path` None the tensors are consumed and dropped: a rank that
    takes part in the gathers and writes nothing."""
    if path is None:
        for _ in tensors:
            pass
        return
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    expected = iter(names)
    with open(path / WEIGHTS_NAME, "wb") as f:
        f.write(_header(model, names))
        for name, tensor in tensors:
            want = next(expected, None)
            if name != want:
                raise ValueError(f"export: got tensor {name!r} where {want!r} was expected")
            # One host copy at a time, written and dropped (the bytes as they are in memory).
            host = tensor.detach().to("cpu").contiguous()
            f.write(host.reshape(-1).view(torch.uint8).numpy().data)
        missing = next(expected, None)
        if missing is not None:
            raise ValueError(f"export: tensor {missing!r} never arrived")
    # What `PreTrainedModel.save_pretrained` records beside the weights.
    model.config.dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(path)
    if model.can_generate() and model.generation_config is not None:
        model.generation_config.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
