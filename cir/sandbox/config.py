"""`sandbox.*`: the sandbox a training run starts (workers, limits, warm modules).

The modules preloaded by default are defined here once; `Sandbox`, the trainer's config and
`cir bench sandbox` all take them from `DEFAULT_PRELOAD`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

MiB = 1024 * 1024

# Imported once in the warm interpreter: what model-written math code imports most.
DEFAULT_PRELOAD: tuple[str, ...] = ("math", "fractions", "itertools", "sympy", "numpy")


@dataclass
class SandboxConfig:
    """The trainer's sandbox (see `cir.sandbox.Sandbox` for what each limit means).

    workers: snippets running at the same time.
    timeout_s: time limit per snippet: its own time, not time waiting for a CPU (see `Sandbox`).
    memory_mb: address space a snippet may use on top of the preloaded modules.
    max_output_bytes: stdout + stderr kept per snippet (the model sees at most this much).
    preload: modules imported once in the warm interpreter (their installed packages, and
        those they import, are what snippets can see besides the standard library).
    extra_readonly_paths: more host paths shown read-only to snippets. VISIBLE TO THE POLICY:
        model-written code can read whatever is there and print it into its trajectory.
    accept_weaker_isolation: run where the machine cannot isolate snippets (no mount or user
        namespaces); they then see the host's files as far as permissions allow. Without it
        the sandbox refuses to start there, naming what is missing.
    fault_warn_share, fault_stop_share, fault_stop_steps: how much of the machine's failure a
        training run takes. Each step, the share of tool calls that ended in a sandbox fault
        (after the sandbox's own retries) is compared with them: above `fault_warn_share` (1%)
        the run warns; above `fault_stop_share` (5%) for `fault_stop_steps` (3) steps in a row
        it saves a checkpoint and stops with exit code 3, naming the figures (`--resume`
        continues once the machine is fixed). `fault_stop_share=1` never stops.
    """

    workers: int = 2
    timeout_s: float = 5.0
    memory_mb: int = 2048
    max_output_bytes: int = 16384
    preload: list[str] = field(default_factory=lambda: list(DEFAULT_PRELOAD))
    extra_readonly_paths: list[str] = field(default_factory=list)
    accept_weaker_isolation: bool = False
    fault_warn_share: float = 0.01
    fault_stop_share: float = 0.05
    fault_stop_steps: int = 3

    def __post_init__(self) -> None:
        # Imported here: cir.sandbox stays importable (and `cir sandbox run` fast) without the
        # YAML loader.
        from cir.config_loader import ConfigError

        if self.workers < 1:
            raise ConfigError(f"workers must be >= 1, got {self.workers}")
        for name in ("timeout_s", "memory_mb", "max_output_bytes"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("fault_warn_share", "fault_stop_share"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"{name} must be in [0, 1], got {getattr(self, name)!r}")
        if self.fault_stop_steps < 1:
            raise ConfigError(f"fault_stop_steps must be >= 1, got {self.fault_stop_steps}")
        if isinstance(self.preload, str) or not all(isinstance(m, str) for m in self.preload):
            raise ConfigError(f"preload must be a list of module names, got {self.preload!r}")
        paths = self.extra_readonly_paths
        if isinstance(paths, str) or not all(isinstance(p, str) for p in paths):
            raise ConfigError(f"extra_readonly_paths must be a list of paths, got {paths!r}")
        for path in paths:
            if not os.path.isabs(path) or os.path.normpath(path) == "/":
                raise ConfigError(f"extra_readonly_paths: {path!r} must be an absolute path below /")
            if not os.path.exists(path):
                raise ConfigError(f"extra_readonly_paths: {path!r} does not exist")
