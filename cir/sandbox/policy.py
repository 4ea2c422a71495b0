"""The isolation policy: one object that says how snippets are isolated.

`Sandbox` builds it from its arguments (or takes one), checks it here, and hands it as JSON
to the C++ core (``cir._sandbox``), whose supervisor and zygote read the same fields
(src/sandbox/policy.h): which namespaces, the uid per worker slot, what a snippet may see
beyond what its interpreter needs, the caps of its writable space, and whether weaker
isolation is acceptable on a machine that cannot provide this one.

What a snippet sees is an allow-list, not the host with parts hidden: an empty read-only root
holding the Python installation, the installed locations of the preloaded packages (and of
the packages they import), the shared libraries and the few /etc and /dev entries the
interpreter needs, and its own work directory. The zygote derives that list from the
interpreter and the preload list (never from the trainer's ``sys.path`` as given, which may
hold the working directory or a project folder); `extra_readonly_paths` adds to it.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field

from cir.sandbox.config import MiB


@dataclass(frozen=True)
class IsolationPolicy:
    """How snippets are isolated (every field is read by the Python and the C++ side).

    namespaces: pid, network, mount and IPC namespaces for the zygote (plus a user namespace
        when the trainer is not root), an IPC namespace per snippet process.
    network: snippets keep the host's network (no network namespace, no socket filter).
    uid_per_slot: as root, each worker slot runs snippets as its own unprivileged uid.
    extra_readonly_paths: more host paths shown read-only to snippets, i.e. to the policy
        being trained: whatever is there, model-written code can read (and print into its
        trajectory). For data the snippets are meant to use, never for anything else.
    work_dir_bytes, work_dir_inodes: the writable space of a snippet (its work directory, on
        a tmpfs of its worker slot): at most this many bytes and files.
    accept_weaker_isolation: start even where the machine cannot provide the isolation
        above (no mount or user namespaces: some containers, distributions that restrict
        unprivileged user namespaces). Snippets then see the host's files as far as their
        permissions allow. Without it such a sandbox refuses to start, saying what is missing.
    """

    namespaces: bool = True
    network: bool = False
    uid_per_slot: bool = True
    extra_readonly_paths: tuple[str, ...] = field(default_factory=tuple)
    work_dir_bytes: int = 64 * MiB
    work_dir_inodes: int = 4096
    accept_weaker_isolation: bool = False

    def __post_init__(self) -> None:
        for name in ("namespaces", "network", "uid_per_slot", "accept_weaker_isolation"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"IsolationPolicy.{name} must be a bool, got {getattr(self, name)!r}")
        paths = self.extra_readonly_paths
        if isinstance(paths, str) or not all(isinstance(p, str) for p in paths):
            raise TypeError(f"IsolationPolicy.extra_readonly_paths must be a list of paths, got {paths!r}")
        object.__setattr__(self, "extra_readonly_paths", tuple(paths))
        for path in self.extra_readonly_paths:
            if not os.path.isabs(path):
                raise ValueError(f"IsolationPolicy.extra_readonly_paths: {path!r} is not an absolute path")
            if os.path.normpath(path) == "/":
                raise ValueError("IsolationPolicy.extra_readonly_paths: '/' would show the whole host")
            if not os.path.exists(path):
                raise ValueError(f"IsolationPolicy.extra_readonly_paths: {path!r} does not exist")
        if not isinstance(self.work_dir_bytes, int) or self.work_dir_bytes < MiB:
            raise ValueError(f"IsolationPolicy.work_dir_bytes must be an int >= 1 MiB, got {self.work_dir_bytes!r}")
        if not isinstance(self.work_dir_inodes, int) or self.work_dir_inodes < 16:
            raise ValueError(f"IsolationPolicy.work_dir_inodes must be an int >= 16, got {self.work_dir_inodes!r}")

    def to_json(self) -> str:
        """What the C++ core reads (IsolationPolicy::from_json, which rejects unknown fields)."""
        data = asdict(self)
        data["extra_readonly_paths"] = list(self.extra_readonly_paths)
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> IsolationPolicy:
        data = json.loads(text)
        data["extra_readonly_paths"] = tuple(data["extra_readonly_paths"])
        return cls(**data)
