"""The filesystem a snippet sees: an allow-list derived from the interpreter and the preloads.

The zygote calls `plan_root` once, after importing the preload modules and before it builds
the snippets' root (C++: ``setup_root``, an empty read-only tmpfs root holding only what the
plan names, each at its host path). What is shown:

- the interpreter: its executable (and the symlinks leading to it, e.g. a virtual
  environment's ``bin/python``), ``pyvenv.cfg`` of a virtual environment, the standard
  library (with ``lib-dynload``);
- the shared libraries the zygote has loaded (``/proc/self/maps``), and the directories the
  dynamic loader searches (``/etc/ld.so.conf``, ``/lib``, ``/usr/lib``, ...: system
  libraries, which modules of the standard library that are not loaded yet may need), with
  ``/etc/ld.so.cache``;
- for each module the preload brought in (the preload list and everything importing it
  imported) that is not part of the standard library: its top-level package directory or
  module file, with the package's ``<name>.libs`` and ``<name>-*.dist-info`` beside it. Not the
  directory holding it: a ``site-packages`` inside a checkout shows only those packages;
  a module imported from the working directory or a project folder shows only itself; a
  package directory inside a shown directory (the standard library's ``site-packages``,
  ``/usr/lib/python3/dist-packages``) is covered by an empty one with only these on top;
- the time zone data (``/etc/localtime``, the interpreter's TZPATH) and the `extra` paths
  the policy names.

Never the trainer's ``sys.path`` as given (the working directory, a project folder), nor
homes, data, runs, checkpoints or caches, unless a preloaded module lives there (then that
module's own files only). Python is only imported here: nothing heavy (the zygote's modules
are what every snippet inherits).
"""

import os
import sys

# Device nodes a Python program uses; /dev/fd, /dev/stdin, ... are links to /proc/self/fd.
DEVICES = ("null", "zero", "full", "random", "urandom")
# Top-level packages never shown for themselves: cir's own (the zygote's code, possibly an
# editable install inside a checkout) is in memory already and not the snippets' to read.
_NOT_OFFERED = {"cir", "__main__"}


def plan_root(preloaded: list, extra: tuple = (), *, slots: int, work_root: str, new_proc: bool) -> dict:
    """The plan `cir._sandbox.setup_root` carries out (a JSON-ready dict): binds (real paths,
    none inside another), symlinks (path, target) met on the way to them, devices."""
    paths = interpreter_paths() + library_paths() + module_paths(preloaded) + time_zone_paths()
    paths += list(extra)
    binds, symlinks = resolve(paths)
    binds, masks, inner = mask_package_directories(binds, real_paths(module_paths(preloaded) + list(extra)))
    return {
        "binds": binds,
        "symlinks": symlinks,
        "masks": masks,
        "inner_binds": inner,
        "devices": [d for d in DEVICES if os.path.exists(f"/dev/{d}")],
        "work_root": work_root,
        "slots": int(slots),
        "new_proc": bool(new_proc),
    }


def interpreter_paths() -> list:
    """The executable as the trainer named it and as it is, the standard library, pyvenv.cfg."""
    paths = [sys.executable, os.path.realpath(sys.executable)]
    stdlib = getattr(sys, "_stdlib_dir", None) or os.path.dirname(os.__file__)
    paths.append(stdlib)
    for module in ("_json", "_struct", "math", "select"):  # extension modules of lib-dynload
        found = getattr(sys.modules.get(module), "__file__", None)
        if found:
            paths.append(os.path.dirname(found))
    zipped = os.path.join(sys.base_prefix, "lib", f"python{sys.version_info[0]}{sys.version_info[1]}.zip")
    paths.append(zipped)
    if sys.prefix != sys.base_prefix:
        paths.append(os.path.join(sys.prefix, "pyvenv.cfg"))
    return [p for p in paths if p and os.path.exists(p)]


def library_paths() -> list:
    """Shared objects mapped into this process, the loader's search directories and cache."""
    paths = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                fields = line.split(maxsplit=5)
                if len(fields) == 6 and "x" in fields[1] and fields[5].startswith("/"):
                    path = fields[5].rstrip("\n")
                    if not path.endswith(" (deleted)") and not _inside_not_offered(path):
                        paths.append(path)
    except OSError:
        pass
    paths += loader_directories()
    paths.append("/etc/ld.so.cache")
    return [p for p in dict.fromkeys(paths) if os.path.exists(p)]


def loader_directories(conf: str = "/etc/ld.so.conf") -> list:
    """Directories the dynamic loader searches: its configuration and the default ones."""
    dirs = []
    _read_loader_conf(conf, dirs, depth=0)
    dirs += ["/lib", "/lib64", "/usr/lib", "/usr/lib64"]
    return [d for d in dict.fromkeys(dirs) if os.path.isdir(d)]


def _read_loader_conf(path: str, out: list, depth: int) -> None:
    import glob

    if depth > 8:
        return
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError:
        return
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("include "):
            pattern = line.split(None, 1)[1]
            if not os.path.isabs(pattern):
                pattern = os.path.join(os.path.dirname(path), pattern)
            for included in sorted(glob.glob(pattern)):
                _read_loader_conf(included, out, depth + 1)
        elif line.startswith("/"):
            out.append(line)


def module_paths(names: list) -> list:
    """The files of the top-level packages that the modules `names` belong to (not the
    standard library's, which is shown whole): package directories or module files, with
    their vendored libraries and metadata beside them."""
    stdlib = os.path.realpath(getattr(sys, "_stdlib_dir", None) or os.path.dirname(os.__file__))
    tops = dict.fromkeys(name.split(".", 1)[0] for name in names)
    paths = []
    for top in tops:
        if top in _NOT_OFFERED:
            continue
        module = sys.modules.get(top)
        if module is None:
            continue
        locations = list(getattr(module, "__path__", None) or [])
        if not locations and getattr(module, "__file__", None):
            locations = [module.__file__]
        for location in locations:
            location = os.path.abspath(location)
            if not os.path.exists(location) or _under(os.path.realpath(location), stdlib):
                continue
            paths.append(location)
            paths += _beside(location, top)
    return paths


def _beside(location: str, top: str) -> list:
    """<top>.libs (wheels' vendored shared libraries) and <top>-*.dist-info next to a package."""
    parent = os.path.dirname(location)
    want = top.lower().replace("-", "_")
    found = []
    try:
        entries = os.listdir(parent)
    except OSError:
        return found
    for entry in entries:
        norm = entry.lower().replace("-", "_")
        if norm == f"{want}.libs" or (norm.startswith(f"{want}_") and norm.endswith(".dist_info")):
            found.append(os.path.join(parent, entry))
    return found


def time_zone_paths() -> list:
    import sysconfig

    paths = ["/etc/localtime"]
    paths += [p for p in (sysconfig.get_config_var("TZPATH") or "").split(os.pathsep) if p]
    return [p for p in paths if os.path.exists(p)]


def resolve(paths: list) -> tuple:
    """(binds, symlinks): every path resolved the way the kernel walks it, each symlink met
    recorded at its own (real) location, the real end point to bind; binds inside another
    bind and symlinks inside a bind dropped (the outer bind shows them)."""
    links: dict = {}
    real = []
    for path in paths:
        end = _walk(os.path.abspath(path), links, 0)
        if end is not None:
            real.append(end)
    binds: list = []
    for path in sorted(set(real)):
        if not any(_under(path, kept) for kept in binds):
            binds.append(path)
    symlinks = [[p, t] for p, t in sorted(links.items()) if not any(_under(p, kept) for kept in binds)]
    return binds, symlinks


def real_paths(paths: list) -> list:
    out = []
    for path in paths:
        end = _walk(os.path.abspath(path), {}, 0)
        if end is not None:
            out.append(end)
    return out


# Where installed packages live inside an interpreter's or the system's library directories.
_PACKAGE_DIRS = ("site-packages", "dist-packages")


def mask_package_directories(binds: list, wanted: list) -> tuple:
    """A shown directory may hold every package installed there (the standard library's
    site-packages, /usr/lib/python3/dist-packages under /usr/lib): each such directory is
    covered by an empty one (a mask), and only the `wanted` entries below it (the preloaded
    packages' files) are shown again on top. Returns (binds, masks, inner binds)."""
    masks = []
    for bind in binds:
        if not os.path.isdir(bind):
            continue
        for pattern in ("", "python3*", "lib/python3*", "python3*/lib/python3*"):
            for name in _PACKAGE_DIRS:
                masks += _glob_dirs(os.path.join(bind, pattern, name) if pattern else os.path.join(bind, name))
    masks = sorted({m for m in masks if not os.path.islink(m)})
    masks = [m for m in masks if not any(_under(m, other) and m != other for other in masks)]
    inner = sorted({w for w in wanted if any(_under(w, m) for m in masks)})
    inner = [w for w in inner if not any(_under(w, other) and w != other for other in inner)]
    outer = [b for b in binds if not any(_under(b, m) for m in masks)]
    return outer, masks, inner


def _glob_dirs(pattern: str) -> list:
    import glob

    return [p for p in glob.glob(pattern) if os.path.isdir(p)]


def _walk(path: str, links: dict, depth: int):
    if depth > 40:
        return None  # a symlink loop
    parts = [p for p in path.split("/") if p]
    current = "/"
    for i, part in enumerate(parts):
        if part == ".":
            continue
        if part == "..":
            current = os.path.dirname(current)
            continue
        candidate = os.path.join(current, part)
        if os.path.islink(candidate):
            target = os.readlink(candidate)
            links[candidate] = target
            rest = "/".join([target, *parts[i + 1 :]])
            return _walk(rest if target.startswith("/") else os.path.join(current, rest), links, depth + 1)
        current = candidate
    return current if os.path.exists(current) else None


def _under(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory.rstrip("/") + "/")


def _inside_not_offered(path: str) -> bool:
    for top in _NOT_OFFERED:
        module = sys.modules.get(top)
        for location in getattr(module, "__path__", None) or []:
            if _under(path, os.path.realpath(location)):
                return True
    return False


def world_readable(paths: list) -> bool:
    """Whether users other than the owner may read every path (a slot uid must)."""
    for path in paths:
        try:
            if not os.stat(path).st_mode & 0o004:
                return False
        except OSError:
            return False
    return True
