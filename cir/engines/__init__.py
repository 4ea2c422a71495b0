"""Generation engines behind one interface (see `cir.engines.base`), made by one factory
(`cir.engines.factory.make_engine`).

`HFEngine` (transformers + torch, CPU and CUDA) is imported on first use, since it pulls in
transformers.
"""

from cir.engines.base import Completion, Engine, SamplingParams, StopPredicate, register_stop_rule, stop_rule
from cir.engines.factory import ENGINES, make_engine

__all__ = [
    "ENGINES",
    "Completion",
    "Engine",
    "HFEngine",
    "SamplingParams",
    "StopPredicate",
    "make_engine",
    "register_stop_rule",
    "stop_rule",
]


def __getattr__(name: str):
    if name == "HFEngine":
        from cir.engines.hf import HFEngine

        return HFEngine
    raise AttributeError(f"module 'cir.engines' has no attribute {name!r}")
