// cir._sandbox: the Python face of the C++ sandbox core (src/sandbox).
//
// Two halves: `Supervisor` is used by cir.sandbox.client in the training process; `ZygoteServer`
// and the helpers below are used by cir.sandbox.zygote, the warm interpreter. Every call that
// waits releases the GIL.
#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>
#include <sys/prctl.h>
#include <sys/random.h>
#include <unistd.h>

#include <cerrno>
#include <optional>
#include <stdexcept>

#include "sandbox/arena_pool.h"
#include "sandbox/isolation.h"
#include "sandbox/json.h"
#include "sandbox/mt19937.h"
#include "sandbox/policy.h"
#include "sandbox/protocol.h"
#include "sandbox/supervisor.h"
#include "sandbox/util.h"
#include "sandbox/zygote.h"

namespace nb = nanobind;
using namespace nb::literals;
namespace sb = cir::sandbox;

namespace {

nb::dict outcome_dict(sb::Outcome& o) {
  nb::dict d;
  d["infra_error"] = o.infra_error;
  d["infra_message"] = o.infra_message;
  d["stdout"] = nb::bytes(o.out.data(), o.out.size());
  d["stderr"] = nb::bytes(o.err.data(), o.err.size());
  d["truncated"] = o.truncated;
  d["truncated_stream"] = o.truncated_stream;
  d["timed_out"] = o.timed_out;
  d["cancelled"] = o.cancelled;
  d["fault"] = o.fault;
  d["has_status"] = o.has_status;
  d["exit_code"] = o.exit_code;
  d["wall_ms"] = o.wall_ms;
  d["cpu_ms"] = o.cpu_ms;
  d["maxrss_kb"] = o.maxrss_kb;
  d["attempts"] = o.attempts;
  return d;
}

nb::dict ns_dict(const sb::NamespaceSet& ns) {
  nb::dict d;
  d["user"] = ns.user;
  d["pid"] = ns.pid;
  d["net"] = ns.net;
  d["mount"] = ns.mount;
  d["ipc"] = ns.ipc;
  return d;
}

std::string to_string(nb::bytes b) { return std::string(b.c_str(), b.size()); }

// ---- generators reseeded in each natively forked child ---------------------------------
//
// A fresh interpreter seeds `random` from the OS (under os.fork its at-fork handler does),
// and cir gives numpy's global generator a fresh 32-bit seed (numpy.random.seed). Done
// through Python that costs a child ~130 page copies (the calls touch much interpreter
// state); written directly it costs the generators' own pages. The layouts below are the
// interpreter's RandomObject and numpy's mt19937_state; cir.sandbox.zygote binds them only after
// checking, on live objects, that a direct write equals the Python-level seeding.

struct RandomObjectLayout {  // CPython Modules/_randommodule.c
  PyObject_HEAD
  int index;
  uint32_t state[sb::mt19937::kStateWords];
};

struct NumpyMt19937Layout {  // numpy/random/src/mt19937/mt19937.h
  uint32_t key[sb::mt19937::kStateWords];
  int pos;
};

struct NumpyBitgenHead {  // numpy/random/bitgen.h: bitgen_t starts with the state pointer
  void* state;
};

struct BoundGenerators {
  RandomObjectLayout* random = nullptr;
  NumpyMt19937Layout* numpy = nullptr;
};
BoundGenerators g_generators;

void seed_random(RandomObjectLayout* r, const uint32_t* key, size_t n) {
  sb::mt19937::init_by_array(r->state, key, n);
  r->index = sb::mt19937::kStateWords;
}

void seed_numpy(NumpyMt19937Layout* s, uint32_t seed) {
  sb::mt19937::init_genrand(s->key, seed);
  s->pos = sb::mt19937::kStateWords;
}

void fill_from_os(void* buf, size_t len) {
  auto* p = static_cast<char*>(buf);
  while (len > 0) {
    ssize_t n = getrandom(p, len, 0);
    if (n < 0) {
      if (errno == EINTR) continue;
      // No entropy source (never on Linux >= 3.17): a child must still differ from its siblings.
      uint64_t x = uint64_t(sb::monotonic_ns()) ^ (uint64_t(getpid()) << 32);
      for (size_t i = 0; i < len; ++i) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        p[i] = char(x);
      }
      return;
    }
    p += n;
    len -= size_t(n);
  }
}

void reseed_bound_generators() {
  if (g_generators.random) {
    uint32_t key[sb::mt19937::kStateWords];
    fill_from_os(key, sizeof key);
    seed_random(g_generators.random, key, sb::mt19937::kStateWords);
  }
  if (g_generators.numpy) {
    uint32_t seed;
    fill_from_os(&seed, sizeof seed);
    seed_numpy(g_generators.numpy, seed);
  }
}

// `obj` as the interpreter's generator object, after checking it is one (an instance of
// _random.Random, whose instance size is the layout's): anything else is refused.
RandomObjectLayout* random_object_of(nb::handle obj) {
  nb::object base = nb::module_::import_("_random").attr("Random");
  auto* type = reinterpret_cast<PyTypeObject*>(base.ptr());
  if (!PyObject_TypeCheck(obj.ptr(), type) || type->tp_basicsize != Py_ssize_t(sizeof(RandomObjectLayout)))
    throw std::invalid_argument("not a _random.Random of the layout this module knows");
  return reinterpret_cast<RandomObjectLayout*>(obj.ptr());
}

NumpyMt19937Layout* numpy_state_of(nb::handle capsule) {
  void* p = PyCapsule_GetPointer(capsule.ptr(), "BitGenerator");
  if (p == nullptr) throw nb::python_error();
  return static_cast<NumpyMt19937Layout*>(static_cast<NumpyBitgenHead*>(p)->state);
}

}  // namespace

NB_MODULE(_sandbox, m) {
  m.doc() = "C++ core of cir.sandbox (supervisor, zygote loop, isolation primitives)";

  // ---- supervisor (training process) ----
  nb::class_<sb::Supervisor>(m, "Supervisor")
      .def(
          "__init__",
          [](sb::Supervisor* self, std::vector<std::string> argv, std::vector<std::string> env, std::string config_json,
             std::string policy_json, int workers, size_t max_output_bytes, uint32_t uid_base, std::string host_tmp_dir,
             double startup_timeout_s, std::string executable, int fault_attempts, double retry_backoff_s,
             double restart_backoff_s, double restart_backoff_max_s, int unavailable_after, double wall_guard_factor,
             double wall_guard_extra_s) {
            sb::SupervisorOptions o;
            o.executable = std::move(executable);
            o.zygote_argv = std::move(argv);
            o.zygote_env = std::move(env);
            o.zygote_config_json = std::move(config_json);
            o.policy_json = std::move(policy_json);
            o.workers = workers;
            o.max_output_bytes = max_output_bytes;
            o.uid_base = uid_base;
            o.host_tmp_dir = std::move(host_tmp_dir);
            o.startup_timeout_s = startup_timeout_s;
            o.fault_attempts = fault_attempts;
            o.retry_backoff_s = retry_backoff_s;
            o.restart_backoff_s = restart_backoff_s;
            o.restart_backoff_max_s = restart_backoff_max_s;
            o.unavailable_after = unavailable_after;
            o.wall_guard_factor = wall_guard_factor;
            o.wall_guard_extra_s = wall_guard_extra_s;
            new (self) sb::Supervisor(std::move(o));
          },
          "argv"_a, "env"_a, "config_json"_a, "policy_json"_a, "workers"_a, "max_output_bytes"_a, "uid_base"_a = 0,
          "host_tmp_dir"_a = "/tmp", "startup_timeout_s"_a = 300.0, "executable"_a = "", "fault_attempts"_a = 3,
          "retry_backoff_s"_a = 0.05, "restart_backoff_s"_a = 0.1, "restart_backoff_max_s"_a = 30.0,
          "unavailable_after"_a = 3, "wall_guard_factor"_a = 3.0, "wall_guard_extra_s"_a = 5.0)
      .def(
          "wait_ready",
          [](sb::Supervisor& s, double timeout_s) {
            std::string err;
            bool ok;
            {
              nb::gil_scoped_release release;
              ok = s.wait_ready(timeout_s, &err);
            }
            if (!ok) throw std::runtime_error(err);
          },
          "timeout_s"_a)
      .def(
          "submit",
          [](sb::Supervisor& s, nb::bytes code, std::vector<nb::bytes> cells, double timeout_s, double replay_timeout_s,
             uint64_t as_bytes, uint64_t cpu_seconds, uint64_t fsize_bytes, uint32_t nproc, uint32_t nofile,
             bool notify) {
            sb::Job j;
            j.code = to_string(code);
            for (auto& c : cells) j.cells.push_back(to_string(c));
            j.timeout_s = timeout_s;
            j.replay_timeout_s = replay_timeout_s;
            j.as_bytes = as_bytes;
            j.cpu_seconds = cpu_seconds;
            j.fsize_bytes = fsize_bytes;
            j.nproc = nproc;
            j.nofile = nofile;
            j.notify = notify;
            return s.submit(std::move(j));
          },
          "code"_a, "cells"_a, "timeout_s"_a, "replay_timeout_s"_a, "as_bytes"_a, "cpu_seconds"_a, "fsize_bytes"_a,
          "nproc"_a, "nofile"_a, "notify"_a = false)
      .def(
          "wait",
          [](sb::Supervisor& s, uint64_t id) {
            sb::Outcome o;
            {
              nb::gil_scoped_release release;
              o = s.wait(id);
            }
            return outcome_dict(o);
          },
          "id"_a)
      .def("take_notified",
           [](sb::Supervisor& s) {
             auto done = s.take_notified();
             nb::list out;
             for (auto& [id, o] : done) out.append(nb::make_tuple(id, outcome_dict(o)));
             return out;
           })
      .def_prop_ro("notify_fd", &sb::Supervisor::notify_fd)
      .def("cancel", &sb::Supervisor::cancel, "id"_a)
      .def("close", &sb::Supervisor::close, nb::call_guard<nb::gil_scoped_release>())
      .def("stats",
           [](sb::Supervisor& s) {
             sb::SupervisorStats st = s.stats();
             nb::dict d;
             d["submitted"] = st.submitted;
             d["executed"] = st.executed;
             d["timeouts"] = st.timeouts;
             d["output_limits"] = st.output_limits;
             d["retries"] = st.retries;
             d["restarts"] = st.restarts;
             d["start_failures"] = st.start_failures;
             d["faults_interpreter_lost"] = st.faults_interpreter_lost;
             d["faults_start_failed"] = st.faults_start_failed;
             d["faults_host_resource"] = st.faults_host_resource;
             d["faults_starved"] = st.faults_starved;
             d["unavailable"] = st.unavailable;
             d["queued"] = st.queued;
             d["inflight"] = st.inflight;
             d["occupied_slots"] = st.occupied_slots;
             d["zygote_pid"] = st.zygote_pid;
             d["ready"] = st.ready;
             d["available"] = st.available;
             return d;
           })
      .def_prop_ro("ready_json", &sb::Supervisor::ready_json)
      .def_prop_ro("zygote_log", &sb::Supervisor::zygote_log)
      .def_prop_ro("namespaces", [](sb::Supervisor& s) { return ns_dict(s.namespaces()); })
      .def_prop_ro("uid_base", &sb::Supervisor::uid_base)
      .def_prop_ro("uid_slots", &sb::Supervisor::uid_slots)
      .def_prop_ro("drop_uid", &sb::Supervisor::drop_uid_effective);

  // ---- zygote (warm interpreter) ----
  nb::class_<sb::ChildRequest>(m, "ChildRequest")
      .def_prop_ro("req_id", [](const sb::ChildRequest& r) { return r.req.req_id; })
      .def_prop_ro("slot", [](const sb::ChildRequest& r) { return r.req.slot; })
      .def_prop_ro("workdir", [](const sb::ChildRequest& r) { return r.workdir; })
      .def_prop_ro("handed_to_spare", [](const sb::ChildRequest& r) { return r.handed_to_spare; });

  nb::class_<sb::ZygoteServer>(m, "ZygoteServer")
      .def(nb::init<int>(), "ctrl_fd"_a)
      .def("read_hello", &sb::ZygoteServer::read_hello)
      .def(
          "configure",
          [](sb::ZygoteServer& z, std::string policy_json, bool net_namespace, std::string work_root, bool slot_dirs,
             bool drop_uid, uint32_t uid_base, bool drop_capabilities, uint64_t as_extra_bytes, uint32_t nproc_extra,
             bool sweep_orphans, bool spares) {
            sb::IsolationPolicy policy = sb::IsolationPolicy::from_json(policy_json);
            sb::ZygoteOptions o;
            o.work_root = std::move(work_root);
            o.slot_dirs = slot_dirs;
            o.drop_uid = drop_uid;
            o.uid_base = uid_base;
            o.drop_capabilities = drop_capabilities;
            o.seccomp = true;
            o.block_inet_sockets = !policy.network && !net_namespace;
            o.ipc_per_snippet = policy.namespaces;
            o.landlock = true;
            o.as_extra_bytes = as_extra_bytes;
            o.nproc_extra = nproc_extra;
            o.sweep_orphans = sweep_orphans;
            o.spares = spares;
            sb::ZygoteOptions e = z.configure(o);
            nb::dict d;
            d["seccomp"] = e.seccomp;
            d["seccomp_blocks_inet"] = e.seccomp && e.block_inet_sockets;
            d["ipc_namespace_per_snippet"] = e.ipc_per_snippet;
            d["landlock_scopes"] = e.landlock;
            d["orphan_sweep"] = e.sweep_orphans;
            return d;
          },
          "policy_json"_a, "net_namespace"_a, "work_root"_a, "slot_dirs"_a, "drop_uid"_a, "uid_base"_a,
          "drop_capabilities"_a, "as_extra_bytes"_a, "nproc_extra"_a, "sweep_orphans"_a, "spares"_a = true)
      .def("send_ready", &sb::ZygoteServer::send_ready, "json"_a, "uses_host_work_root"_a)
      .def("send_refused", &sb::ZygoteServer::send_refused, "why"_a)
      .def("next_request",
           [](sb::ZygoteServer& z) -> std::optional<sb::ChildRequest> {
             sb::ChildRequest r;
             if (!z.next_request(&r)) return std::nullopt;
             return r;
           })
      .def("started", &sb::ZygoteServer::started, "request"_a, "pid"_a)
      .def("start_failed", &sb::ZygoteServer::start_failed, "request"_a, "error"_a)
      .def_prop_ro("wants_spare", &sb::ZygoteServer::wants_spare)
      .def("prepare_spare", &sb::ZygoteServer::prepare_spare)
      .def("spare_forked", &sb::ZygoteServer::spare_forked, "pid"_a)
      .def("spare_fork_failed", &sb::ZygoteServer::spare_fork_failed)
      .def("become_spare", &sb::ZygoteServer::become_spare)
      .def(
          "serve",
          [](sb::ZygoteServer& z) -> nb::object {
            // The GIL stays held: the zygote is single-threaded, and the child must come out
            // of fork holding it, as the thread that forked did.
            sb::ChildRequest r;
            sb::ServeResult kind = z.serve(&r);
            if (kind == sb::ServeResult::Shutdown) return nb::none();
            reseed_bound_generators();  // in the child, first thing (a spare: while it waits)
            if (kind == sb::ServeResult::Spare) return nb::make_tuple("spare", nb::none());
            return nb::make_tuple("run", nb::cast(std::move(r)));
          },
          "The native loop: returns None in the zygote at shutdown; in a forked child\n"
          "('spare', None) (then call become_spare()) or ('run', request). Python's at-fork\n"
          "handlers are not run; generators bound with bind_generators are reseeded.")
      .def(
          "install_seccomp_for_children",
          [](sb::ZygoteServer& z) {
            std::string err;
            bool ok = z.install_seccomp_for_children(&err);
            return nb::make_tuple(ok, err);
          },
          "Installs the snippets' seccomp filter once, on the zygote; returns (ok, error).")
      .def_prop_ro("seccomp_inherited", &sb::ZygoteServer::seccomp_inherited)
      .def(
          "enter_child",
          [](sb::ZygoteServer& z, const sb::ChildRequest& r) {
            sb::ChildProgram p = z.enter_child(r);
            nb::list cells;
            for (auto& c : p.cells) cells.append(nb::bytes(c.data(), c.size()));
            return nb::make_tuple(cells, nb::bytes(p.code.data(), p.code.size()), p.status_fd);
          },
          "request"_a)
      .def("fail_setup", &sb::ZygoteServer::fail_setup, "request"_a, "what"_a,
           "In a child, before its code runs: reports a set-up failure (the machine's fault) and exits.")
      .def_prop_ro("running", &sb::ZygoteServer::running);

  m.def(
      "setup_root",
      [](std::string policy_json, std::string plan_json, bool weaker) {
        sb::IsolationPolicy policy = sb::IsolationPolicy::from_json(policy_json);
        sb::json::Value v = sb::json::parse(plan_json);
        sb::RootPlan plan;
        plan.binds = sb::json::get_strings(v, "binds");
        plan.masks = sb::json::get_strings(v, "masks");
        plan.inner_binds = sb::json::get_strings(v, "inner_binds");
        plan.devices = sb::json::get_strings(v, "devices");
        plan.work_root = sb::json::get_string(v, "work_root");
        plan.slots = uint32_t(sb::json::get_uint(v, "slots"));
        plan.new_proc = sb::json::get_bool(v, "new_proc");
        const sb::json::Value* links = sb::json::member(v, "symlinks");
        if (links == nullptr || links->kind != sb::json::Value::Kind::Array)
          throw std::invalid_argument("plan: \"symlinks\" must be an array");
        for (const auto& pair : links->array) {
          if (pair.kind != sb::json::Value::Kind::Array || pair.array.size() != 2 ||
              pair.array[0].kind != sb::json::Value::Kind::String || pair.array[1].kind != sb::json::Value::Kind::String)
            throw std::invalid_argument("plan: each symlink must be [path, target]");
          plan.symlinks.emplace_back(pair.array[0].string, pair.array[1].string);
        }
        nb::dict d;
        if (weaker) {
          std::string error;
          bool ok = sb::setup_private_tmp(plan, policy, &error);
          d["ok"] = ok;
          d["error"] = error;
          d["slot_tmpfs"] = ok;
          d["private_proc"] = ok && plan.new_proc;
          return d;
        }
        sb::RootReport r = sb::setup_root(plan, policy);
        d["ok"] = r.ok;
        d["error"] = r.error;
        d["visible"] = r.visible;
        d["masked"] = r.masked;
        d["devices"] = r.devices;
        d["slot_tmpfs"] = r.slot_tmpfs;
        d["private_proc"] = r.private_proc;
        d["chroot"] = r.chroot;
        return d;
      },
      "policy_json"_a, "plan_json"_a, "weaker"_a = false,
      "Zygote: the snippets' filesystem (weaker=False: the allow-list root of the plan; True: only a private /tmp).");
  m.def("policy_fields", &sb::IsolationPolicy::field_names, "The isolation policy's fields as the C++ side reads them.");
  m.def(
      "check_policy", [](std::string policy_json) { sb::IsolationPolicy::from_json(policy_json); }, "policy_json"_a,
      "Raises ValueError if the C++ side does not accept the policy JSON.");
  m.def("landlock_abi", &sb::landlock_abi);
  m.def(
      "start_aligned_arenas",
      [] {
        // Registered once and kept: it frees chunk arenas and plain ones alike, and after
        // stop_aligned_arenas() allocates exactly as the interpreter's own allocator does.
        static bool registered = false;
        sb::arena_pool::start();
        if (!registered) {
          PyObjectArenaAllocator a{nullptr, sb::arena_pool::alloc, sb::arena_pool::free};
          PyObject_SetArenaAllocator(&a);
          registered = true;
        }
      },
      "Zygote: serve the interpreter's object arenas from 2 MiB-aligned chunks (see arena_pool.h).");
  m.def("stop_aligned_arenas", [] { return sb::arena_pool::stop(); },
        "Back to plain mmap for later arenas; returns the bytes held in chunks.");
  m.def("aligned_arena_stats", [] {
    sb::arena_pool::Stats st = sb::arena_pool::stats();
    nb::dict d;
    d["chunks"] = st.chunks;
    d["arenas"] = st.arenas;
    d["fallback_arenas"] = st.fallback_arenas;
    d["active"] = st.active;
    return d;
  });
  m.def("self_vm_size", &sb::self_vm_size_bytes);
  m.def("collapse_into_huge_pages", &sb::collapse_into_huge_pages);
  m.def("count_tasks_of_uid", [](uint32_t uid) { return sb::count_tasks_of_uid(uid_t(uid)); }, "uid"_a);
  m.def("seccomp_supported", &sb::seccomp_supported);
  m.def("set_child_subreaper", [] { return prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0; });
  m.def(
      "write_status",
      [](int fd, int kind, int status) {
        sb::write_status_record(fd, static_cast<sb::proto::StatusKind>(kind), status);
      },
      "fd"_a, "kind"_a, "status"_a = 0,
      "Reports to the supervisor: kind 1 = session replay done, 2 = done (about to exit with status).");
  m.def("monotonic_ns", &sb::monotonic_ns);
  m.def(
      "seed_generators_directly",
      [](nb::object random_inst, nb::object numpy_capsule, std::vector<uint32_t> key, uint32_t numpy_seed) {
        if (!random_inst.is_none()) {
          if (key.empty()) throw std::invalid_argument("key must not be empty");
          seed_random(random_object_of(random_inst), key.data(), key.size());
        }
        if (!numpy_capsule.is_none()) seed_numpy(numpy_state_of(numpy_capsule), numpy_seed);
      },
      "random_inst"_a.none(), "numpy_capsule"_a.none(), "key"_a, "numpy_seed"_a,
      "Writes the generators' state as random.seed(int from `key` words) and\n"
      "numpy.random.seed(numpy_seed) would (for checking the layouts; either may be None).");
  m.def(
      "bind_generators",
      [](nb::object random_inst, nb::object numpy_capsule) {
        // The objects live as long as the zygote (module globals).
        g_generators.random = random_inst.is_none() ? nullptr : random_object_of(random_inst);
        g_generators.numpy = numpy_capsule.is_none() ? nullptr : numpy_state_of(numpy_capsule);
      },
      "random_inst"_a.none(), "numpy_capsule"_a.none(),
      "Generators serve() reseeds in every child it forks (checked layouts only; see cir.sandbox.zygote).");
}
