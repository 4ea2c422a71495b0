"""Generation engines behind one interface (see `cir.engines.base`), registered by name and made
by one factory (`cir.engines.factory`: `register_engine`, `make_engine`; `hf` and `vllm` are
registered there).

`HFEngine` (transformers + torch, CPU and CUDA) is imported on first use, since it pulls in
transformers; importing this package imports neither torch nor transformers.
"""

from cir.engines.base import Completion, Engine, SamplingParams, StopPredicate, register_stop_rule, stop_rule
from cir.engines.factory import engine_names, make_engine, register_engine

__all__ = [
    "Completion",
    "Engine",
    "HFEngine",
    "SamplingParams",
    "StopPredicate",
    "engine_names",
    "make_engine",
    "register_engine",
    "register_stop_rule",
    "stop_rule",
]


def __getattr__(name: str):
    if name == "HFEngine":
        from cir.engines.hf import HFEngine

        return HFEngine
    raise AttributeError(f"module 'cir.engines' has no attribute {name!r}")
