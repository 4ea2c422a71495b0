"""What separates a snippet from the trainer: its environment, and a description of the
isolation active on this machine (the zygote reports the facts once it is ready).
"""

from __future__ import annotations

import os
import sys


def child_environment(workdir: str) -> dict[str, str]:
    """The whole environment of a snippet (nothing is inherited from the trainer)."""
    path = os.pathsep.join(dict.fromkeys([os.path.dirname(sys.executable), "/usr/local/bin", "/usr/bin", "/bin"]))
    return {
        "PATH": path,
        "HOME": workdir,
        "TMPDIR": workdir,
        "LANG": "C.UTF-8",
        # The zygote must stay single-threaded to fork safely; BLAS pools would break that.
        "OPENBLAS_NUM_THREADS": "1",
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }


def describe_isolation(facts: dict, *, network: bool = False) -> str:
    """One line per mechanism, as active on this machine; the filesystem line names every
    path a snippet can see."""
    ns = facts.get("namespaces", {})
    fs = facts.get("filesystem") or {}
    lines = []
    active = [name for name in ("pid", "net", "mount", "ipc", "user") if ns.get(name)]
    lines.append("namespaces: " + (", ".join(active) if active else "none"))
    if facts.get("drop_uid"):
        lo, hi = facts.get("uid_range") or (facts.get("uid_base"), None)
        lines.append(f"identity: one unprivileged uid/gid per worker slot ({lo}..{hi}), no capabilities, no_new_privs")
    else:
        lines.append(
            "identity: snippets run as the trainer's uid (not root: no privilege to drop), "
            "no capabilities, no_new_privs"
        )
    if ns.get("pid"):
        lines.append(
            "processes: pid namespace (the zygote is its init); everything a snippet starts is killed when it ends"
        )
    elif facts.get("drop_uid"):
        lines.append("processes: everything of the slot uid is killed when a snippet ends (subreaper zygote)")
    else:
        lines.append("processes: process group + orphan sweep of the subreaper zygote")
    caps = ""
    if fs.get("slot_tmpfs"):
        caps = f" (at most {fs.get('work_dir_bytes', 0) // 2**20} MiB and {fs.get('work_dir_inodes')} files, its worker slot's own tmpfs)"
    if fs.get("root") == "allow-list" and fs.get("ok"):
        visible = ", ".join(fs.get("visible", []))
        devices = ", ".join(fs.get("devices", []))
        masked = ", ".join(fs.get("masked", []))
        lines.append(
            "filesystem: an empty read-only root; visible read-only: "
            f"{visible}" + (f" (shown empty but for the preloaded packages: {masked})" if masked else "") + "; "
            f"devices: {devices}; /proc; writable: only the snippet's own work dir{caps}"
        )
    elif fs.get("ok"):
        lines.append(f"filesystem: the host's files, as far as permissions allow (weaker isolation); work dirs{caps}")
    else:
        lines.append("filesystem: the host's files, as far as permissions allow; work dirs on the host /tmp")
    if fs.get("private_proc"):
        lines.append("/proc: shows only the sandbox's processes")
    separation = []
    if facts.get("ipc_namespace_per_snippet"):
        separation.append("its own IPC namespace (SysV shm, semaphores, message queues, POSIX queues: gone with it)")
    if facts.get("landlock_scopes"):
        separation.append("its own Landlock domain (no signal or abstract unix socket reaches outside it)")
    if separation:
        lines.append("between snippets: each has " + " and ".join(separation))
    if network:
        lines.append("network: allowed (network=True)")
    elif ns.get("net"):
        lines.append("network: empty network namespace (loopback down, no interfaces)")
    elif facts.get("seccomp_blocks_inet"):
        lines.append("network: AF_INET/AF_INET6 sockets refused by seccomp")
    else:
        lines.append("network: NOT isolated")
    if facts.get("seccomp"):
        lines.append("seccomp: namespaces, mount, bpf, perf, io_uring, keyctl, module and x32 syscalls refused")
    lines.append(
        "limits: RLIMIT_AS, RLIMIT_CPU, RLIMIT_FSIZE, RLIMIT_NPROC, RLIMIT_NOFILE, RLIMIT_CORE=0, "
        "its own time (wall clock less CPU-queue wait, within a wall-clock guard), output size"
    )
    return "\n".join(lines)


def isolation_warnings(facts: dict, *, network: bool = False) -> list[str]:
    """What is weaker than the full isolation on this machine (logged when a sandbox starts)."""
    ns = facts.get("namespaces", {})
    fs = facts.get("filesystem") or {}
    out = []
    if not facts.get("drop_uid"):
        out.append("snippets run under the trainer's own uid (no root to drop from)")
    if not network and not ns.get("net") and not facts.get("seccomp_blocks_inet"):
        out.append("network is NOT isolated (no network namespace, no seccomp)")
    if not ns.get("pid") and not facts.get("drop_uid") and not facts.get("orphan_sweep"):
        out.append("detached descendants of snippets may survive them (no pid namespace, uid or orphan sweep)")
    if not (fs.get("root") == "allow-list" and fs.get("ok")):
        why = fs.get("allow_list_error") or fs.get("error") or "no mount namespace"
        out.append(f"snippets see the host's files as far as permissions allow ({why}; accept_weaker_isolation)")
    if facts.get("python_readable_by_snippets") is False:
        out.append(
            "part of what snippets are shown is not readable by their uid (mode 0700 or less): "
            "they can only import the preloaded modules"
        )
    if not facts.get("landlock_scopes") and not facts.get("drop_uid"):
        out.append("concurrent snippets share a uid and no Landlock scopes: one can signal another")
    return out
