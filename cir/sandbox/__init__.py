"""Run model-written Python snippets fast and isolated.

A :class:`Sandbox` keeps one warm interpreter (the *zygote*: a Python process with sympy,
numpy, ... imported and exercised once) and forks it for every snippet, so a snippet pays
neither interpreter start-up nor imports. The C++ core (``cir._sandbox``) queues requests,
feeds a fixed number of worker slots, captures output through pipes, enforces the limits
and restarts the zygote if it dies; the GIL is released while it waits.

Each snippet runs in a fresh process that looks like ``python -c CODE``: same exit status,
stdout and traceback, its own empty working directory, a clean environment, rlimits on
address space, CPU time, file size, processes and open files, no network, an unprivileged
uid when the trainer runs as root, and nothing it started survives it. It sees an allow-list
of files (the interpreter and the preloaded packages), never the trainer's. The policy is one
`IsolationPolicy`; see :attr:`Sandbox.isolation` for what is active on the current machine.
A result says whose fault it was (`ExecResult.fault`): the machine's faults are retried, and
reported as status "sandbox_fault" if they persist.

    with Sandbox(workers=4) as sb:
        sb.run("print(2 + 2)").stdout            # '4\\n'
        sb.run_batch(["1/0", "print(1)"])        # order kept
        await sb.arun(code, session="traj-17")   # asyncio; sees earlier cells of traj-17

Modules: `client` (Sandbox, SandboxError, launch_settings), `results` (ExecResult, STATUSES,
FAULT_REASONS, classify and its helpers), `config` (SandboxConfig, DEFAULT_PRELOAD), `policy`
(IsolationPolicy), `rootfs` (what a snippet sees: the allow-list), `isolation` (the snippet
environment and the description of the isolation in effect), `reference` (run_fresh:
the same snippet alone in a fresh ``python -c``, what the sandbox is compared against),
`zygote` (the warm interpreter's own code). The ``cir sandbox run`` command is `cir.cli.sandbox`.
"""

import importlib

# Public name -> the module that defines it. Imported on first use, not here: the zygote
# imports `cir.sandbox.zygote`, which runs this file first, and should hold what a fresh
# interpreter holds. The client's imports (asyncio, logging, ...) would add modules a snippet
# can see, and at-fork handlers every child would have to run (asyncio registers one from
# Python 3.12 on). For the same reason this file imports nothing but importlib (which the
# zygote needs anyway), not even typing.
_EXPORTS = {
    "Sandbox": "client",
    "SandboxError": "client",
    "launch_settings": "client",
    "ExecResult": "results",
    "STATUSES": "results",
    "FAULT_REASONS": "results",
    "IsolationPolicy": "policy",
    "classify": "results",
    "last_line": "results",
    "is_memory_error": "results",
    "truncation_marker": "results",
    "SandboxConfig": "config",
    "DEFAULT_PRELOAD": "config",
    "describe_isolation": "isolation",
    "isolation_warnings": "isolation",
    "child_environment": "isolation",
    "run_fresh": "reference",
    "run_fresh_batch": "reference",
}

__all__ = [
    "DEFAULT_PRELOAD",
    "FAULT_REASONS",
    "STATUSES",
    "ExecResult",
    "IsolationPolicy",
    "Sandbox",
    "SandboxConfig",
    "SandboxError",
    "child_environment",
    "classify",
    "describe_isolation",
    "is_memory_error",
    "isolation_warnings",
    "last_line",
    "launch_settings",
    "run_fresh",
    "run_fresh_batch",
    "truncation_marker",
]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


TYPE_CHECKING = False  # true for type checkers, which then see the names' origins
if TYPE_CHECKING:
    from cir.sandbox.client import Sandbox, SandboxError, launch_settings
    from cir.sandbox.config import DEFAULT_PRELOAD, SandboxConfig
    from cir.sandbox.isolation import (
        child_environment,
        describe_isolation,
        isolation_warnings,
    )
    from cir.sandbox.policy import IsolationPolicy
    from cir.sandbox.reference import run_fresh, run_fresh_batch
    from cir.sandbox.results import (
        FAULT_REASONS,
        STATUSES,
        ExecResult,
        classify,
        is_memory_error,
        last_line,
        truncation_marker,
    )
