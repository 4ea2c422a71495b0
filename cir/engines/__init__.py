"""Generation engines behind one interface (see `cir.engines.base`).

`HFEngine` (transformers + torch, CPU and CUDA) is imported on first use, since it pulls in
transformers.
"""

from cir.engines.base import Completion, Engine, SamplingParams, StopPredicate

__all__ = ["Completion", "Engine", "HFEngine", "SamplingParams", "StopPredicate"]


def __getattr__(name: str):
    if name == "HFEngine":
        from cir.engines.hf import HFEngine

        return HFEngine
    raise AttributeError(f"module 'cir.engines' has no attribute {name!r}")
