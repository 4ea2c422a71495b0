"""Ground truth for ``cir bench sandbox``: each snippet alone in a fresh ``python -c``, cached.

The reference runs are those of `cir.sandbox.reference.run_fresh_batch`: one fresh interpreter
per snippet under the same limits as the sandbox (memory, CPU, file size, open files, wall clock,
output cap), started and judged the way the sandbox starts and judges one, at most ``parallel``
at a time. This module adds what the benchmark needs around it: the limits one run applies to
every system (`Limits`), the record every system is scored by (`Outcome`), and a cache.

The grace (``grace_s``, default 3 s) exists because a fresh interpreter's clock includes its own
start-up and the imports (``import sympy`` alone takes about half a second on a quiet machine, and
two seconds on a loaded one) that a warm executor has already paid for; without it a shared
machine turns slow start-ups into false reference timeouts. A snippet is therefore a reference
timeout when it runs past ``timeout_s + grace_s``; one that finished after more than
``timeout_s`` is flagged by the benchmark as near the limit (its status is then ambiguous). The
benchmark corpus has no such snippet: its snippets need milliseconds or never end.

Results are cached in one JSON file per (Python version, sympy/numpy versions, limits), one
entry per snippet keyed by the SHA-256 of its code, so later runs and subsets (``--quick``)
reuse what an earlier run computed.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

from cir.sandbox.reference import run_fresh_batch
from cir.sandbox.results import ExecResult, truncation_marker

# 2: stdin is an open, silent pipe (was /dev/null); 3: the sandbox's own reference runner
# (its rlimits, environment, output cap and status rule).
CACHE_FORMAT = 3
DEFAULT_GRACE_S = 3.0


@dataclass(frozen=True)
class Limits:
    """The limits one benchmark run applies to every system (sandbox, baseline, ground truth)."""

    timeout_s: float = 2.0
    memory_mb: int = 2048
    max_output_bytes: int = 65536

    def __post_init__(self) -> None:
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s}")
        if self.memory_mb < 64:
            raise ValueError(f"memory_mb must be >= 64, got {self.memory_mb}")
        if self.max_output_bytes < 1:
            raise ValueError(f"max_output_bytes must be >= 1, got {self.max_output_bytes}")


@dataclass
class Outcome:
    """What one system reported for one snippet, in the sandbox's status vocabulary.

    ``stdout`` holds at most ``max_output_bytes`` of output (decoded as UTF-8, undecodable bytes
    replaced); ``error_line`` is the last non-empty line of stderr (the traceback's last line).
    """

    status: str
    stdout: str
    error_line: str = ""
    exit_code: int | None = None
    wall_ms: float = 0.0

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, row: dict) -> Outcome:
        return cls(**{k: row[k] for k in ("status", "stdout", "error_line", "exit_code", "wall_ms")})


def to_outcome(result: ExecResult, limits: Limits) -> Outcome:
    """An `ExecResult` (of the sandbox or of the reference) as an :class:`Outcome`: the
    truncation marker is not output, so it is left out of ``stdout``."""
    stdout = result.stdout
    marker = truncation_marker(limits.max_output_bytes)
    if result.status == "output_limit" and stdout.endswith(marker):
        stdout = stdout[: -len(marker)]
    return Outcome(result.status, stdout, result.error_line, result.exit_code, float(result.wall_ms))


def reference_outcomes(
    codes: Sequence[str],
    limits: Limits,
    parallel: int = 2,
    on_done: Callable[[int], None] | None = None,
    grace_s: float = DEFAULT_GRACE_S,
) -> list[Outcome]:
    """Each code alone in a fresh interpreter under `limits` plus `grace_s` (uncached)."""
    results = run_fresh_batch(
        codes,
        parallel=parallel,
        on_done=on_done,
        timeout_s=limits.timeout_s,
        memory_mb=limits.memory_mb,
        max_output_bytes=limits.max_output_bytes,
        grace_s=grace_s,
    )
    return [to_outcome(r, limits) for r in results]


# ---------------------------------------------------------------------------------------------
# cache
# ---------------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "cir"


def environment_key(limits: Limits, grace_s: float) -> str:
    """What, besides the code, decides a snippet's reference result."""

    def version(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "absent"

    ident = {
        "format": CACHE_FORMAT,
        "python": sys.version,
        "implementation": platform.python_implementation(),
        "machine": platform.machine(),
        "sympy": version("sympy"),
        "numpy": version("numpy"),
        "limits": asdict(limits),
        "grace_s": grace_s,
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:20]


def code_key(code: str) -> str:
    return hashlib.sha256(code.encode("utf-8")).hexdigest()


def ground_truth(
    codes: Sequence[str],
    limits: Limits,
    cache_dir: Path | None = None,
    refresh: bool = False,
    parallel: int = 2,
    on_progress: Callable[[int, int], None] | None = None,
    grace_s: float = DEFAULT_GRACE_S,
) -> tuple[list[Outcome], dict]:
    """Reference outcomes for ``codes`` (cached); returns ``(outcomes, info)``.

    ``info`` says where the cache lives, how many snippets were computed now and how long
    that took. ``refresh=True`` recomputes every snippet asked for.
    """
    cache_dir = default_cache_dir() if cache_dir is None else Path(cache_dir)
    path = cache_dir / f"sandbox_truth-{environment_key(limits, grace_s)}.json"
    entries: dict[str, dict] = {}
    if path.exists() and not refresh:
        try:
            entries = json.loads(path.read_text())["entries"]
        except (OSError, ValueError, KeyError, TypeError):
            entries = {}  # unreadable cache: recompute, then overwrite it
    keys = [code_key(c) for c in codes]
    missing: list[int] = []  # first index of each snippet not in the cache
    seen: set[str] = set()
    for i, k in enumerate(keys):
        if k not in entries and k not in seen:
            seen.add(k)
            missing.append(i)
    t0 = time.perf_counter()
    if missing:
        report = (lambda k: on_progress(k, len(missing))) if on_progress else None
        fresh = reference_outcomes([codes[i] for i in missing], limits, parallel, report, grace_s=grace_s)
        for i, out in zip(missing, fresh):
            entries[keys[i]] = out.to_json()
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(
            json.dumps({"format": CACHE_FORMAT, "limits": asdict(limits), "grace_s": grace_s, "entries": entries})
        )
        tmp.replace(path)
    info = {
        "cache_file": str(path),
        "computed": len(missing),
        "from_cache": len(codes) - len(missing),
        "compute_s": round(time.perf_counter() - t0, 3),
        "grace_s": grace_s,
    }
    return [Outcome.from_json(entries[k]) for k in keys], info
