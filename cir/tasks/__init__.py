"""Built-in tasks: a named stand-in for a dataset, a model folder and a prompt at once.

A task module provides
- `problems(cfg, split) -> list[Problem]`: what `data.train=<name>` / `data.eval=[<name>]` load;
- `build_policy(cfg, device, dtype) -> (model, tokenizer, metrics)`: what `model.path=<name>`
  builds (e.g. a tiny model and its warm start);
- `PROMPT`: a `PromptTemplate` registered under the task's name (`data.prompt=<name>`).

`cfg` is the run's `TrainConfig`; a task reads its own section there. The trainer and the data
and model loaders never name a task: they ask `get_task(name)` whether a name is one.
"""

from __future__ import annotations

import importlib
from types import ModuleType

# name -> module; imported on first use (a task may pull in torch and transformers).
TASKS: dict[str, str] = {"demo": "cir.tasks.demo"}


def get_task(name: str) -> ModuleType | None:
    """The task module called `name`, or None when `name` is not a task."""
    module = TASKS.get(name)
    return None if module is None else importlib.import_module(module)
