"""The warm interpreter ("zygote") that cir's sandbox forks once per snippet.

Started by the supervisor (``cir._sandbox.Supervisor``) with a minimal environment, possibly
as pid 1 of fresh pid/net/mount/ipc namespaces. It

1. reads the supervisor's hello (namespaces in effect, the isolation policy, options),
2. imports the preload modules and runs a short warm-up, so that first-use costs (sympy's
   caches and lazily imported submodules, numpy's linalg) are paid once, not per snippet,
3. builds the snippets' filesystem and enters it: an empty read-only root holding only what
   the interpreter and the preloaded packages need (`cir.sandbox.rootfs`), /proc, a few
   /dev nodes, and one capped tmpfs per worker slot for the work directories,
4. prepares what every snippet starts from (argv, path, environment, a pristine
   ``__main__``), freezes its objects for the collector, backs its heap with huge pages,
   takes the free small-object blocks and installs the seccomp filter, once,
5. then forks one child per request: natively from a C++ loop (``ZygoteServer.serve``), or
   through ``os.fork`` from the reference loop in Python. The child locks itself down
   (C++: ``enter_child``), sets what differs per snippet, runs the code and exits the way
   ``python -c`` exits.

Nearly all of a snippet's cost beyond its own code is memory management: the fork copies
the zygote's page tables, every page the child writes is copied, the exit tears it all
down. Hence the care here to make the zygote's memory cheap to fork (huge pages, a zygote
that writes nothing between forks) and to have children write as few of its pages as
possible (src/sandbox/NOTES.md has the measurements).

Only imported by the zygote process itself; nothing here runs in the training process.
"""

import os
import sys


def main() -> None:
    import json

    from cir import _sandbox

    vm_at_start = _sandbox.self_vm_size()
    modules_at_start = set(sys.modules)
    server = _sandbox.ZygoteServer(3)
    hello = json.loads(server.read_hello())
    config = hello["config"]
    policy = hello["policy"]  # the IsolationPolicy's fields (cir.sandbox.policy), as JSON
    policy_json = json.dumps(policy)
    huge_pages = bool(config.get("huge_pages", True))
    if huge_pages:
        # Arenas for the objects the imports and the warm-up create, in 2 MiB-aligned chunks:
        # the whole heap can then be backed by huge pages (see collapse below).
        _sandbox.start_aligned_arenas()
    ns = hello["namespaces"]
    facts: dict = {"namespaces": ns, "zygote_pid_in_namespace": os.getpid()}

    # -- process containment -----------------------------------------------------------------
    if not ns["pid"]:
        # Orphans of snippets come to us instead of the host's init: we reap and kill them.
        facts["subreaper"] = _sandbox.set_child_subreaper()
    drop_uid = bool(hello["drop_uid"])
    shared_uid_tasks = 0
    if not drop_uid:
        # Snippets share our uid, and RLIMIT_NPROC counts all its tasks.
        shared_uid_tasks = _sandbox.count_tasks_of_uid(os.getuid()) + 8

    # -- warm-up -----------------------------------------------------------------------------
    for name in _RUNTIME_MODULES:  # what the child's own code uses, whatever the snippet can read
        __import__(name)
    timings = _preload(config["preload"], bool(config["warmup"]))
    facts["preload_seconds"] = timings
    if huge_pages:
        # From here on arenas come from plain mmap, as in a fresh interpreter (before the
        # address-space baseline below is taken).
        facts["aligned_arena_bytes"] = _sandbox.stop_aligned_arenas()
    vm_extra = max(0, _sandbox.self_vm_size() - vm_at_start)
    facts["vm_baseline_bytes"] = vm_at_start
    facts["vm_preloaded_extra_bytes"] = vm_extra

    # -- filesystem: what snippets see -------------------------------------------------------
    # Derived from the interpreter and what the preload imported (now in sys.modules), never
    # from the trainer's sys.path as given.
    work_root, slot_dirs = hello["host_work_root"], False
    if ns["mount"]:
        from cir.sandbox import rootfs

        preloaded = list(config["preload"]) + sorted(set(sys.modules) - modules_at_start)
        plan = rootfs.plan_root(
            preloaded,
            tuple(policy["extra_readonly_paths"]),
            slots=int(hello["uid_slots"]),
            work_root=_WORK_ROOT,
            new_proc=bool(ns["pid"]),
        )
        report = _sandbox.setup_root(policy_json, json.dumps(plan))
        filesystem = {"root": "allow-list", **report}
        if not report["ok"]:
            if not policy["accept_weaker_isolation"]:
                server.send_refused(
                    f"cir sandbox: refusing to start: cannot build the snippets' filesystem ({report['error']}); "
                    "pass accept_weaker_isolation=True (sandbox.accept_weaker_isolation=true) to run them with the "
                    "host's files in view"
                )
                return
            report = _sandbox.setup_root(policy_json, json.dumps(plan), weaker=True)
            filesystem = {"root": "host", "allow_list_error": filesystem["error"], **report}
        if report["ok"]:
            work_root, slot_dirs = _WORK_ROOT, True
            _forget_host_paths(config["sys_path"])
        filesystem.update(
            work_dir_bytes=int(policy["work_dir_bytes"]),
            work_dir_inodes=int(policy["work_dir_inodes"]),
            symlinks=len(plan["symlinks"]),
        )
        facts["filesystem"] = filesystem
        # A snippet (another uid) must be able to read what is shown to it.
        facts["python_readable_by_snippets"] = not drop_uid or rootfs.world_readable(plan["binds"])
    else:
        facts["filesystem"] = {"root": "host", "ok": False, "slot_tmpfs": False, "private_proc": False}
    facts["work_root"] = work_root
    facts["host_work_root"] = hello["host_work_root"] if work_root == hello["host_work_root"] else None
    if not work_root:
        raise SystemExit("cir-sandbox zygote: no work directory available")

    options = server.configure(
        policy_json=policy_json,
        net_namespace=bool(ns["net"]),
        work_root=work_root,
        slot_dirs=slot_dirs,
        drop_uid=drop_uid,
        uid_base=int(hello["uid_base"]),
        drop_capabilities=bool(ns["user"]) or (os.geteuid() == 0 and not drop_uid),
        as_extra_bytes=vm_extra,
        nproc_extra=shared_uid_tasks,
        sweep_orphans=not drop_uid,
    )
    seccomp = options["seccomp"]
    facts.update(options)
    facts.update(
        drop_uid=drop_uid,
        uid_base=int(hello["uid_base"]),
        nproc_shared_extra=shared_uid_tasks,
        python=sys.version.split()[0],
    )

    # Exit handlers registered so far (by the warm-up, e.g. sympy's lambdify through
    # weakref.finalize, and by our own extension module) would otherwise run in every child at
    # exit, where a fresh interpreter has none: run the finalizers now, drop the handlers.
    import atexit
    import weakref

    for finalizer in list(weakref.finalize._registry):
        finalizer()
    atexit._clear()
    weakref.finalize._registered_with_atexit = False  # a snippet's own finalizers register again
    child = _ChildContext(config)
    # What every snippet process starts from (argv, path, hooks, environment) is set here
    # once, not in each child: every page a child writes is a page it must copy.
    child.prepare_zygote()
    # (Before the freeze: the handler lists are found through the collector.)
    native_fork, child_hooks, why_not = _native_fork_plan(bool(config.get("native_fork", True)))
    facts["fork"] = "native" if native_fork else "os.fork"
    if why_not:
        facts["native_fork_unavailable"] = why_not
    if native_fork:
        child_hooks, reseeded = _bind_native_reseeding(child_hooks)
        child.numpy_reseeded_natively = "numpy" in reseeded
        facts["native_reseeding"] = reseeded
    # Objects alive now are never freed in a child: keep the collector off them, so that
    # children do not write to (and copy) the zygote's pages when they collect.
    import gc

    gc.collect()
    gc.freeze()
    # Fewer page-table entries to copy per fork and to tear down per exit.
    facts["huge_page_bytes"] = _sandbox.collapse_into_huge_pages() if huge_pages else 0
    # The seccomp filter goes on the zygote itself, once (after its last mount): children
    # inherit it instead of compiling and attaching their own, and it holds the same.
    if seccomp:
        shared, error = server.install_seccomp_for_children()
        facts["seccomp_installed"] = "once, in the zygote" if shared else "in each child"
        if not shared:
            facts["seccomp_zygote_error"] = error
    if config.get("fill_free_blocks", True):
        # Late, so that little is freed again before the first fork.
        facts["filled_blocks"] = _fill_free_blocks()
    # The fresh __main__ each snippet runs in, made after the freezes like any object a
    # fresh interpreter creates (a snippet's gc.get_referrers sees it).
    child.install_fresh_main()
    sys.stdout.flush()
    sys.stderr.flush()
    server.send_ready(json.dumps(facts), work_root == hello["host_work_root"])

    if native_fork:
        # The loop runs in C++ and forks there: nothing of the zygote's Python state is
        # touched between snippets.
        while True:
            outcome = server.serve()
            if outcome is None:
                return
            kind, request = outcome
            if kind == "spare":
                _child_main(child, server, server.become_spare, child_hooks)
            _child_main(child, server, lambda: request, child_hooks)

    # Reference loop: driven from Python, forking with os.fork.
    while True:
        if server.wants_spare:
            # Fork the next child now, while nothing waits for it: a request then starts
            # without paying for fork.
            server.prepare_spare()
            try:
                pid = os.fork()
            except OSError:
                server.spare_fork_failed()
            else:
                if pid == 0:
                    _child_main(child, server, server.become_spare)
                server.spare_forked(pid)
        request = server.next_request()
        if request is None:
            return
        if request.handed_to_spare:
            continue
        try:
            pid = os.fork()
        except OSError as exc:
            server.start_failed(request, exc.errno or 12)
            continue
        if pid == 0:
            _child_main(child, server, lambda: request)
        server.started(request, pid)


def _child_main(child: "_ChildContext", server, get_request, after_fork=()) -> None:
    """The life of a forked child; never returns into the zygote's loop. `after_fork`: the
    interpreter's at-fork handlers still to run (native fork only; os.fork ran them)."""
    status = 70
    try:
        for handler in after_fork:
            handler()
        child.reseed()  # before the request arrives: a spare does it while it waits
        status = child.run(server, get_request())
    except BaseException:  # noqa: BLE001 - the child must never return into the loop
        try:
            import traceback

            traceback.print_exc()
            sys.stderr.flush()
        except BaseException:  # noqa: BLE001
            pass
    finally:
        os._exit(status)


# Placeholder objects filling the zygote's free small-object blocks (see _fill_free_blocks).
_PLACEHOLDERS: list = []


def _fill_free_blocks() -> int:
    """Fills every free block of the interpreter's small-object allocator with a placeholder
    that lives as long as the zygote; returns how many.

    The warm-up leaves free blocks scattered over thousands of partly used pools. A child
    would fill those first, each new object landing on another of the zygote's pages, which
    the child must then copy. With them taken, a child's objects go to fresh pools, packed
    densely into pages nobody shares. Costs the zygote ~1 MB. The counts come from
    sys._debugmallocstats() (CPython's allocator statistics); a no-op where it is missing.
    (Statistics read afterwards show free blocks again: those of the fresh pools that the
    zygote's next allocations open, which is where a child's objects then go.)
    """
    import gc

    count = 0
    for make, n in _free_block_plan():
        _PLACEHOLDERS.extend(make(i) for i in range(n))
        count += n
    gc.freeze()  # the list itself
    return count


def _free_block_plan() -> list:
    """[(placeholder maker, how many)] that takes every free block and free pool now."""
    import re

    stats = _malloc_stats()
    rows = [(int(a), int(b)) for a, b in re.findall(r"^\s*\d+\s+(\d+)\s+\d+\s+\d+\s+(\d+)\s*$", stats, re.M)]
    plan = [(_placeholder_of_size(size), free) for size, free in rows if free]
    # Whole free pools too: the zygote's own later allocations and a child's then start a
    # fresh arena instead of a pool among the zygote's pages.
    unused = re.search(r"^(\d+) unused pools \* (\d+) bytes", stats, re.M)
    if unused and rows:
        largest = max(size for size, _ in rows)
        pool_bytes, header_bytes = int(unused[2]), 48  # pool header: 48 bytes on 64-bit builds
        plan.append((_placeholder_of_size(largest), int(unused[1]) * ((pool_bytes - header_bytes) // largest)))
    return [(make, n) for make, n in plan if make is not None and n > 0]


def _placeholder_of_size(size: int):
    """A maker of distinct, untracked objects that take a block of exactly `size` bytes
    (sizes are multiples of 16), or None."""
    if size >= 48:
        return lambda i: bytes(size - sys.getsizeof(b""))  # length >= 15: never a cached singleton
    if size == 32 and 16 < sys.getsizeof(0.5) <= 32:
        return lambda i: i + 0.5  # (a few may come from the float free list instead)
    if size == 16 and sys.getsizeof(object()) == 16:
        return lambda i: object()
    return None


def _malloc_stats() -> str:
    """The text sys._debugmallocstats() writes to the C-level stderr, or ""."""
    if not hasattr(sys, "_debugmallocstats") or not hasattr(os, "memfd_create"):
        return ""
    sys.stderr.flush()
    fd = os.memfd_create("cir-malloc-stats")
    saved = os.dup(2)
    try:
        os.dup2(fd, 2)
        try:
            sys._debugmallocstats()
        finally:
            os.dup2(saved, 2)
        os.lseek(fd, 0, os.SEEK_SET)
        chunks = []
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
        return b"".join(chunks).decode("ascii", "replace")
    finally:
        os.close(saved)
        os.close(fd)


def _bind_native_reseeding(child_hooks: list) -> tuple[list, list[str]]:
    """Native fork: lets the C++ side reseed ``random`` and numpy's global generator in each
    child by writing their state directly, which costs a child a few page copies where the
    Python-level calls cost ~130. Each generator is bound only if a direct write, tried here
    on the live object, leaves exactly the state the Python-level seeding does (same
    getstate()); otherwise the child seeds it through Python as under os.fork.

    Returns the child at-fork handlers still to run in the child, and the generators bound.
    """
    import random

    from cir import _sandbox

    bound_random = None
    left = []
    for hook in child_hooks:
        if bound_random is None and type(random._inst) is random.Random and hook == random._inst.seed:
            if _direct_seeding_matches(random._inst, None):
                bound_random = random._inst
                random._inst.gauss_next = None  # the rest of what Random.seed() does
                continue
        left.append(hook)
    numpy = sys.modules.get("numpy")
    capsule = None
    if numpy is not None:
        generator = getattr(getattr(numpy.random, "mtrand", None), "_rand", None)
        bit_generator = getattr(generator, "_bit_generator", None)
        if type(bit_generator).__name__ == "MT19937" and _direct_seeding_matches(None, generator):
            capsule = bit_generator.capsule
    _sandbox.bind_generators(bound_random, capsule)
    return left, [name for name, g in (("random", bound_random), ("numpy", capsule)) if g is not None]


def _direct_seeding_matches(random_inst, numpy_generator) -> bool:
    """Seeds one generator through _sandbox.seed_generators_directly and compares its state
    with the same seeding done through Python; restores the generator afterwards."""
    import random

    from cir import _sandbox

    # A key whose top word is non-zero, so random.seed(int) uses all 624 words of it.
    key = [(2654435761 * (i + 1)) & 0xFFFFFFFF or 1 for i in range(624)]
    numpy_seed = 2024
    try:
        if random_inst is not None:
            saved = random_inst.getstate()
            try:
                _sandbox.seed_generators_directly(random_inst, None, key, 0)
                direct = random_inst.getstate()[:2]
                reference = random.Random(int.from_bytes(b"".join(w.to_bytes(4, "little") for w in key), "little"))
                return direct == reference.getstate()[:2]
            finally:
                random_inst.setstate(saved)
        try:
            numpy_generator.seed(1)  # no cached Gaussian, as after numpy.random.seed
            _sandbox.seed_generators_directly(None, numpy_generator._bit_generator.capsule, [], numpy_seed)
            direct = numpy_generator.get_state(legacy=False)
            reference = type(numpy_generator)(numpy_seed).get_state(legacy=False)
            return (
                direct["state"]["pos"] == reference["state"]["pos"]
                and bool((direct["state"]["key"] == reference["state"]["key"]).all())
                and direct["has_gauss"] == reference["has_gauss"] == 0
            )
        finally:
            numpy_generator.seed(1)  # the zygote's generator stays without a cached Gaussian
    except Exception:  # noqa: BLE001 - any surprise means: not the layout we know
        return False


# At-fork handlers the native fork may leave out, by (module, qualified name). They reset
# locks another thread may have held at fork time, and threading's records of the other
# threads, to what they already are when the forking process has a single thread and holds
# none of these locks, as the zygote does while it sits in its C++ loop.
_REDUNDANT_SINGLE_THREADED = {
    "before": {("logging", "_acquireLock"), ("logging", "_prepareFork")},
    "parent": {("logging", "_releaseLock"), ("logging", "_afterFork")},
    "child": {("threading", "_after_fork"), ("logging", "_after_at_fork_child_reinit_locks")},
}


def _native_fork_plan(wanted: bool) -> tuple[bool, list, str]:
    """Whether the zygote may fork natively (without Python's at-fork machinery), which
    handlers a child must then run itself, and if not, why.

    The interpreter keeps the handlers registered with os.register_at_fork in three lists
    with no accessor; they are found through a sentinel handler registered here. Native fork
    needs a single-threaded zygote and no unknown "before"/"parent" handler; every "child"
    handler outside the redundant set (e.g. random's reseeding) runs in the child, in order.
    """
    import gc
    import types

    if not wanted:
        return False, [], ""
    try:
        if len(os.listdir("/proc/self/task")) != 1:
            return False, [], "the zygote has more than one thread"
    except OSError:
        return False, [], "cannot count the zygote's threads"

    def sentinel() -> None:
        pass

    def parent_sentinel() -> None:
        pass

    def child_sentinel() -> None:
        pass

    os.register_at_fork(before=sentinel, after_in_parent=parent_sentinel, after_in_child=child_sentinel)
    lists = {}
    for key, marker in (("before", sentinel), ("parent", parent_sentinel), ("child", child_sentinel)):
        found = [r for r in gc.get_referrers(marker) if isinstance(r, list) and any(h is marker for h in r)]
        if len(found) != 1:
            return False, [], "cannot see the interpreter's at-fork handlers"
        lists[key] = [h for h in found[0] if h is not marker]

    def name(handler) -> tuple[str, str]:
        if not isinstance(handler, types.FunctionType):
            return ("", "")
        return (handler.__module__, handler.__qualname__)

    for key in ("before", "parent"):
        unknown = [h for h in lists[key] if name(h) not in _REDUNDANT_SINGLE_THREADED[key]]
        if unknown:
            return False, [], f"unknown at-fork handler ({key}): {unknown[0]!r}"
    return True, [h for h in lists["child"] if name(h) not in _REDUNDANT_SINGLE_THREADED["child"]], ""


def _other_threads_to_join(threading) -> bool:
    """Whether shutdown has non-daemon threads besides the main one to wait for (each
    registers a lock in ``_shutdown_locks``; the main thread's own is there too unless an
    at-fork handler cleared the set). True when this interpreter keeps no such set."""
    locks = getattr(threading, "_shutdown_locks", None)
    if locks is None:
        return True
    main_lock = getattr(threading.main_thread(), "_tstate_lock", None)
    return any(lock is not main_lock for lock in locks)


# Modules the child-side code below needs; imported in the zygote so a child never has to
# read them from disk (it may not be allowed to).
_RUNTIME_MODULES = (
    "atexit",
    "builtins",
    "importlib.machinery",
    "io",
    "linecache",
    "resource",
    "signal",
    "threading",
    "traceback",
    "types",
    "warnings",
)


# Where the work directories are, in the snippets' root: one tmpfs per worker slot below it.
_WORK_ROOT = "/tmp/cir-work"


def _forget_host_paths(sys_path: list) -> None:
    """After the switch to the snippets' root: the import system's caches describe the
    host's directories (listings of a whole site-packages, finders for folders that are gone
    now): drop them, so that a snippet's imports see only its own root. Then fill them again
    from the new root, once, here: a child would list the directories for every import of a
    module not loaded yet, and lose the listing when it exits."""
    import importlib
    import importlib.machinery

    for path in list(sys.path_importer_cache):
        if path and not os.path.exists(path):
            del sys.path_importer_cache[path]
    importlib.invalidate_caches()
    # A failed look-up visits every entry of the path: each finder lists its directory.
    importlib.machinery.PathFinder.find_spec("_cir_no_such_module_", [p for p in sys_path if p and os.path.exists(p)])


_WARMUP_SYMPY = """
x, y, z, n, k = sympy.symbols("x y z n k")
sympy.solve(x**2 - 5*x + 6, x)
sympy.solve([x + y - 3, x - y - 1], [x, y])
sympy.solveset(x**2 - 4, x, domain=sympy.S.Reals)
sympy.linsolve([x + y - 2, x - y], [x, y])
sympy.simplify(sympy.sin(x)**2 + sympy.cos(x)**2)
sympy.simplify((x**2 - 1) / (x - 1))
sympy.factor(x**4 - 1)
sympy.expand((x + 1)**5)
sympy.summation(k**2, (k, 1, n))
sympy.summation(1 / k**2, (k, 1, sympy.oo))
sympy.factorint(360)
sympy.divisors(60)
sympy.totient(36)
sympy.isprime(97)
list(sympy.primerange(1, 50))
sympy.nextprime(100)
sympy.Rational(1, 3) + sympy.Rational(1, 6)
sympy.sqrt(8)
sympy.nsimplify(0.5)
sympy.limit(sympy.sin(x) / x, x, 0)
sympy.integrate(x**2, (x, 0, 1))
sympy.integrate(sympy.exp(-x), (x, 0, sympy.oo))
sympy.diff(sympy.sin(x) * x, x)
sympy.series(sympy.exp(x), x, 0, 4)
M = sympy.Matrix([[1, 2], [3, 4]])
M.det(); M.inv(); M.eigenvals()
sympy.binomial(10, 3); sympy.factorial(10)
sympy.gcd(12, 18); sympy.lcm(4, 6)
sympy.mod_inverse(3, 7)
sympy.N(sympy.pi, 30)
sympy.roots(x**3 - 1, x)
sympy.Poly(x**3 - 2*x + 1, x).all_coeffs()
sympy.Eq(x + 1, 2)
sympy.nsolve(x**2 - 2, x, 1)
sympy.trigsimp(sympy.sin(x) * sympy.cos(x))
sympy.apart(1 / (x**2 - 1))
sympy.cancel((x**2 - 1) / (x + 1))
sympy.floor(sympy.Rational(7, 2)); sympy.ceiling(sympy.Rational(7, 2))
str(sympy.sqrt(2) * x**2 + sympy.Rational(1, 3))
repr(sympy.Matrix([[x, 1], [0, 1]]))
sympy.latex(x**2 / 3)
sympy.pretty(x**2)
sympy.Integer(10) ** 20 % 7
sympy.continued_fraction(sympy.sqrt(2))
sympy.ntheory.modular.crt([3, 5], [2, 3])
sympy.Sum(k, (k, 1, 10)).doit()
sympy.Product(k, (k, 1, 5)).doit()
sympy.solve(sympy.Abs(x - 1) - 2, x)
sympy.diophantine(x**2 - y**2 - 1)
sympy.expand_log(sympy.log(x * y), force=True)
sympy.fibonacci(20); sympy.catalan(5)
sympy.Float(1) / 3
"""

_WARMUP_NUMPY = """
a = numpy.array([[3.0, 1.0], [1.0, 2.0]])
numpy.linalg.solve(a, numpy.array([9.0, 8.0]))
numpy.linalg.det(a); numpy.linalg.inv(a); numpy.linalg.eig(a); numpy.linalg.norm(a)
numpy.arange(10).sum(); numpy.prod(numpy.arange(1, 6)); numpy.cumsum(numpy.arange(5))
numpy.roots([1, -3, 2]); numpy.polyfit([0, 1, 2], [1, 3, 5], 1)
numpy.random.default_rng(0).integers(0, 10, 5); numpy.random.randint(0, 10, 3)
numpy.mean([1, 2, 3]); numpy.std([1, 2, 3]); numpy.sqrt(2.0)
numpy.linspace(0, 1, 5); numpy.zeros((3, 3)); numpy.eye(3) @ numpy.ones(3)
numpy.unique([1, 1, 2]); numpy.sort([3, 1, 2]); numpy.gcd(12, 18)
str(numpy.array([1.5, 2.5])); repr(numpy.float64(1.0)); numpy.set_printoptions()
"""

_WARMUP_STDLIB = """
import math, cmath, fractions, decimal, itertools, functools, collections, statistics
import random, re, heapq, bisect, string, operator, copy, json, datetime, time, typing
import dataclasses, textwrap, numbers, array, struct, io, traceback, linecache
from fractions import Fraction
from decimal import Decimal, getcontext
Fraction(1, 3) + Fraction(1, 6); Decimal(1) / Decimal(3)
math.comb(10, 3); math.gcd(12, 18); math.isqrt(10**12); math.factorial(20)
list(itertools.permutations(range(4))); list(itertools.combinations(range(5), 2))
collections.Counter("hello").most_common(1); statistics.mean([1, 2, 3]); statistics.median([1, 2, 3])
re.findall(r"\\d+", "a1b22"); sorted({3: 1, 1: 2}.items()); "{:.3f}".format(math.pi)
try:
    1 / 0
except ZeroDivisionError:
    traceback.format_exc()
compile("x = 1\\nprint(x)", "<string>", "exec", dont_inherit=True)
"""


def _preload(modules: list[str], warmup: bool) -> dict[str, float]:
    """Imports `modules` and (with `warmup`) exercises them; returns seconds per step.

    Runs with warnings caught so the zygote's warnings registry does not swallow a warning
    a snippet should see, and with output discarded.
    """
    import ast
    import contextlib
    import importlib
    import io
    import time
    import warnings

    timings: dict[str, float] = {}
    failures: list[str] = []
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        for name in modules:
            t = time.perf_counter()
            try:
                importlib.import_module(name)
            except Exception as exc:  # noqa: BLE001 - a missing optional module is reported, not fatal
                print(f"cir-sandbox zygote: cannot preload {name!r}: {exc}", file=sys.stderr)
            timings[f"import {name}"] = round(time.perf_counter() - t, 4)
        if warmup:
            scripts = [("stdlib", _WARMUP_STDLIB, None)]
            if "sympy" in sys.modules:
                scripts.append(("sympy", _WARMUP_SYMPY, "sympy"))
            if "numpy" in sys.modules:
                scripts.append(("numpy", _WARMUP_NUMPY, "numpy"))
            for label, script, module in scripts:
                t = time.perf_counter()
                scope: dict = {"__name__": "cir_warmup"}
                if module:
                    scope[module] = sys.modules[module]
                # One statement at a time: a failing step (e.g. an API this version lacks)
                # must not skip the rest.
                for statement in ast.parse(script).body:
                    module_ast = ast.Module(body=[statement], type_ignores=[])
                    try:
                        exec(compile(module_ast, f"<warmup {label}>", "exec", dont_inherit=True), scope)
                    except Exception as exc:  # noqa: BLE001
                        failures.append(f"{label} line {statement.lineno}: {exc!r}")
                timings[f"warmup {label}"] = round(time.perf_counter() - t, 4)
            if failures:
                print("cir-sandbox zygote: warm-up steps failed: " + "; ".join(failures), file=sys.stderr)
    return timings


class _ChildContext:
    """Everything the child needs to look like a fresh ``python -c`` process."""

    def __init__(self, config: dict):
        import stat

        self.env_template: dict[str, str] = dict(config["child_env"])
        # As python -c has it: "" (the work dir) first, then the trainer's entries that exist
        # here (in the snippets' root only the shown packages' directories do).
        self.sys_path: list[str] = [""] + [p for p in config["sys_path"][1:] if p and os.path.exists(p)]
        out, err = sys.__stdout__, sys.__stderr__
        self.stdout_encoding = getattr(out, "encoding", None) or "utf-8"
        self.stdout_errors = getattr(out, "errors", None) or "strict"
        self.stderr_encoding = getattr(err, "encoding", None) or "utf-8"
        self.own_code = {_ChildContext.run.__code__, _ChildContext.execute.__code__}
        # Every page a child touches is copied, so it reuses the standard streams the zygote
        # created at start-up over pipes, as for a captured python -c, and never used.
        self.reuse_streams = all(stat.S_ISFIFO(os.fstat(fd).st_mode) for fd in (0, 1, 2)) and all(
            s is not None for s in (sys.stdin, sys.stdout, sys.stderr)
        )

    # -- in the zygote, once ------------------------------------------------------------------
    def prepare_zygote(self) -> None:
        """Puts the interpreter state every snippet starts from in place in the zygote itself,
        so a child inherits it instead of writing it: argv, import path, hooks, the SIGINT
        handler and the environment (in the template's order; HOME and TMPDIR hold
        placeholders until a child knows its work dir)."""
        import signal

        sys.argv = ["-c"]
        sys.path[:] = self.sys_path
        sys.excepthook = sys.__excepthook__
        sys.displayhook = sys.__displayhook__
        sys.unraisablehook = sys.__unraisablehook__
        if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
            signal.signal(signal.SIGINT, signal.default_int_handler)
        if list(os.environ.items()) != list(self.env_template.items()):
            os.environ.clear()
            os.environ.update(self.env_template)
        # A temp dir looked up in the zygote would be cached for every child; a fresh
        # interpreter finds its own (from TMPDIR, the work dir) on first use.
        tempfile = sys.modules.get("tempfile")
        if tempfile is not None:
            tempfile.tempdir = None

    def install_fresh_main(self) -> None:
        """A pristine ``__main__`` module, as a fresh interpreter has before running -c code.
        The zygote never runs code in it, so every child finds it pristine."""
        import builtins
        import importlib.machinery
        import types

        main = types.ModuleType("__main__")
        main.__loader__ = importlib.machinery.BuiltinImporter
        main.__dict__["__annotations__"] = {}
        main.__dict__["__builtins__"] = builtins
        sys.modules["__main__"] = main

    # -- the child's life -------------------------------------------------------------------
    numpy_reseeded_natively = False

    def reseed(self) -> None:
        """numpy's global generator does not reseed itself after fork (``random`` does, through
        its at-fork handler). A 32-bit seed from the OS: full-entropy seeding costs 100x more,
        a third of a print(1). (Under native fork, where bound, the C++ side does it.)"""
        numpy = sys.modules.get("numpy")
        if numpy is not None and not self.numpy_reseeded_natively:
            numpy.random.seed(int.from_bytes(os.urandom(4), "little"))

    def run(self, server, request) -> int:
        from cir import _sandbox

        # A failure to set the process up is the machine's fault, reported (and retried) as
        # such, never through the status pipe, which the snippet's code can write to.
        try:
            main_globals = self.reset_interpreter(request.workdir)
        except BaseException as exc:  # noqa: BLE001
            server.fail_setup(request, f"resetting the interpreter: {exc!r}")
        cells, code, status_fd = server.enter_child(request)  # (calls fail_setup itself)
        if cells:
            self.replay(cells, main_globals)
            _sandbox.write_status(status_fd, 1)
        status = self.execute(code, main_globals)
        return self.finish(status, lambda final: _sandbox.write_status(status_fd, 2, final))

    def reset_interpreter(self, workdir: str) -> dict:
        """What differs per snippet (the rest was set up once by prepare_zygote)."""
        environ = os.environ
        environ["HOME"] = workdir
        environ["TMPDIR"] = workdir
        if not self.reuse_streams:
            self.new_streams()
        return sys.modules["__main__"].__dict__

    def new_streams(self) -> None:
        """Fresh standard streams on the new descriptors, buffered as python -c buffers them
        for pipes: stdout block-buffered, stderr line-buffered."""
        import io

        stdin = io.TextIOWrapper(open(0, "rb", closefd=False), encoding=self.stdout_encoding, errors=self.stdout_errors)
        stdout = io.TextIOWrapper(
            open(1, "wb", closefd=False), encoding=self.stdout_encoding, errors=self.stdout_errors, newline="\n"
        )
        stderr = io.TextIOWrapper(
            open(2, "wb", closefd=False),
            encoding=self.stderr_encoding,
            errors="backslashreplace",
            newline="\n",
            line_buffering=True,
        )
        self._old_streams = (sys.stdin, sys.stdout, sys.stderr)  # never closed
        sys.stdin = sys.__stdin__ = stdin
        sys.stdout = sys.__stdout__ = stdout
        sys.stderr = sys.__stderr__ = stderr

    def replay(self, cells: list[bytes], main_globals: dict) -> None:
        """Runs earlier session cells with their output going nowhere."""
        sys.stdout.flush()
        sys.stderr.flush()
        saved = os.dup(1), os.dup(2)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        os.close(devnull)
        try:
            for cell in cells:
                try:
                    source = cell.decode("utf-8", "surrogateescape")
                    exec(compile(source, "<string>", "exec", dont_inherit=True), main_globals)
                except BaseException:  # noqa: BLE001 - a cell that failed on replay is skipped
                    pass
        finally:
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except BaseException:  # noqa: BLE001
                    pass
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])

    def execute(self, code: bytes, main_globals: dict) -> int:
        """Runs `code` as ``python -c`` would; returns the exit status (or -SIGINT)."""
        try:
            text = code.decode("utf-8", "surrogateescape")
            sys.orig_argv = [sys.executable, "-c", text]
            compiled = compile(text, "<string>", "exec", dont_inherit=True)
            exec(compiled, main_globals)
            return 0
        except SystemExit as exc:
            return self._system_exit_status(exc)
        except BaseException as exc:  # noqa: BLE001 - reported like the interpreter reports it
            self._print_uncaught(exc)
            if isinstance(exc, KeyboardInterrupt):
                import signal

                return -signal.SIGINT
            return 1

    def _print_uncaught(self, exc: BaseException) -> None:
        tb = exc.__traceback__
        while tb is not None and tb.tb_frame.f_code in self.own_code:
            tb = tb.tb_next
        exc.__traceback__ = tb
        try:
            sys.excepthook(type(exc), exc, tb)
        except BaseException:  # noqa: BLE001
            sys.__excepthook__(type(exc), exc, tb)

    @staticmethod
    def _system_exit_status(exc: SystemExit) -> int:
        code = exc.code
        if code is None:
            return 0
        if isinstance(code, int):
            return code & 0xFF
        try:
            sys.stderr.write(f"{code}\n")
        except BaseException:  # noqa: BLE001
            pass
        return 1

    @staticmethod
    def finish(status: int, report_done) -> int:
        """The interpreter's shutdown as far as it is visible: join non-daemon threads, run
        atexit handlers, flush stdout/stderr (a failed flush makes the status 120). Then
        `report_done(status)` tells the supervisor the result is complete, before the
        (slow) teardown of the process."""
        threading = sys.modules.get("threading")
        # Only non-daemon threads other than the main one make shutdown wait.
        if threading is not None and _other_threads_to_join(threading):
            try:
                threading._shutdown()
            except BaseException:  # noqa: BLE001
                pass
        import atexit

        atexit._run_exitfuncs()
        flush_failed = False
        try:
            if sys.stdout is not None:
                sys.stdout.flush()
        except BaseException as exc:  # noqa: BLE001
            flush_failed = True
            try:
                sys.stderr.write(f"Exception ignored in: {sys.stdout!r}\n{type(exc).__name__}: {exc}\n")
            except BaseException:  # noqa: BLE001
                pass
        try:
            if sys.stderr is not None:
                sys.stderr.flush()
        except BaseException:  # noqa: BLE001
            flush_failed = True
        if flush_failed and status >= 0:
            status = 120
        report_done(status)
        if status < 0:
            import signal

            signal.signal(-status, signal.SIG_DFL)
            os.kill(os.getpid(), -status)
        return status


if __name__ == "__main__":
    main()
