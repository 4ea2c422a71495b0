"""`sandbox.*`: the sandbox a training run starts (workers, limits, warm modules).

The modules preloaded by default are defined here once; `Sandbox`, the trainer's config and
`cir bench sandbox` all take them from `DEFAULT_PRELOAD`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

MiB = 1024 * 1024

# Imported once in the warm interpreter: what model-written math code imports most.
DEFAULT_PRELOAD: tuple[str, ...] = ("math", "fractions", "itertools", "sympy", "numpy")


@dataclass
class SandboxConfig:
    """The trainer's sandbox (see `cir.sandbox.Sandbox` for what each limit means).

    workers: snippets running at the same time.
    timeout_s: wall-clock limit per snippet.
    memory_mb: address space a snippet may use on top of the preloaded modules.
    max_output_bytes: stdout + stderr kept per snippet (the model sees at most this much).
    preload: modules imported once in the warm interpreter.
    """

    workers: int = 2
    timeout_s: float = 5.0
    memory_mb: int = 2048
    max_output_bytes: int = 16384
    preload: list[str] = field(default_factory=lambda: list(DEFAULT_PRELOAD))

    def __post_init__(self) -> None:
        # Imported here: cir.sandbox stays importable (and `cir sandbox run` fast) without the
        # YAML loader.
        from cir.config_loader import ConfigError

        if self.workers < 1:
            raise ConfigError(f"workers must be >= 1, got {self.workers}")
        for name in ("timeout_s", "memory_mb", "max_output_bytes"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if isinstance(self.preload, str) or not all(isinstance(m, str) for m in self.preload):
            raise ConfigError(f"preload must be a list of module names, got {self.preload!r}")
