"""Generation engines behind one interface (see `cir.engines.base`)."""

from cir.engines.base import Completion, Engine, SamplingParams, StopPredicate

__all__ = ["Completion", "Engine", "SamplingParams", "StopPredicate"]
