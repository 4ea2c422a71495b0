"""Built-in tasks: a dataset, a model and a prompt under one name, registered into the modules
that own each of them. Importing this package registers every task module in it.

A task module registers, under its own name (the demo: ``demo``),
- its problems: `cir.data.register_problem_set` (what `data.train=<name>` / `data.eval=[<name>]`
  load);
- its model: `cir.models.register_model_builder` (what `model.path=<name>` builds, e.g. a tiny
  model and its warm start), with the model's architecture so an engine can refuse it early;
- its prompt: `cir.prompts.register_prompt` (`data.prompt=<name>`);
- its settings: `cir.training.config.register_section` (the `<name>.*` config section), handed
  to its problem set and model builder as `options`.

Nothing below the command line imports this package: the data, model and prompt loaders and the
trainer find a task's parts in their own registries. The `cir` command imports it; so does code
that uses the built-in tasks by name. A second built-in task is one more module here. Task
modules import torch and transformers only inside the functions that build models, so that
registering them (and `cir train --print-config`) stays instant.
"""

from __future__ import annotations

import importlib
import pkgutil

# Every module of this package is a task.
TASKS: tuple[str, ...] = tuple(sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")))

for _name in TASKS:
    importlib.import_module(f"{__name__}.{_name}")
