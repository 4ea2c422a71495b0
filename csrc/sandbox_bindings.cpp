// cir._sandbox: the Python face of the C++ sandbox core (src/sandbox).
//
// Two halves: `Supervisor` is used by cir.sandbox in the training process; `ZygoteServer`
// and the helpers below are used by cir._zygote, the warm interpreter. Every call that
// waits releases the GIL.
#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>
#include <sys/prctl.h>
#include <unistd.h>

#include <optional>
#include <stdexcept>

#include "sandbox/isolation.h"
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
  d["lost"] = o.lost;
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

}  // namespace

NB_MODULE(_sandbox, m) {
  m.doc() = "C++ core of cir.sandbox (supervisor, zygote loop, isolation primitives)";

  // ---- supervisor (training process) ----
  nb::class_<sb::Supervisor>(m, "Supervisor")
      .def(
          "__init__",
          [](sb::Supervisor* self, std::vector<std::string> argv, std::vector<std::string> env, std::string config_json,
             int workers, size_t max_output_bytes, bool use_namespaces, bool allow_user_namespace, bool net_namespace, bool drop_uid,
             uint32_t uid_base, std::string host_tmp_dir, double startup_timeout_s, std::string executable) {
            sb::SupervisorOptions o;
            o.executable = std::move(executable);
            o.zygote_argv = std::move(argv);
            o.zygote_env = std::move(env);
            o.zygote_config_json = std::move(config_json);
            o.workers = workers;
            o.max_output_bytes = max_output_bytes;
            o.use_namespaces = use_namespaces;
            o.allow_user_namespace = allow_user_namespace;
            o.net_namespace = net_namespace;
            o.drop_uid = drop_uid;
            o.uid_base = uid_base;
            o.host_tmp_dir = std::move(host_tmp_dir);
            o.startup_timeout_s = startup_timeout_s;
            new (self) sb::Supervisor(std::move(o));
          },
          "argv"_a, "env"_a, "config_json"_a, "workers"_a, "max_output_bytes"_a, "use_namespaces"_a = true,
          "allow_user_namespace"_a = true, "net_namespace"_a = true, "drop_uid"_a = true, "uid_base"_a = 0, "host_tmp_dir"_a = "/tmp",
          "startup_timeout_s"_a = 300.0, "executable"_a = "")
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
             d["lost"] = st.lost;
             d["restarts"] = st.restarts;
             d["queued"] = st.queued;
             d["inflight"] = st.inflight;
             d["occupied_slots"] = st.occupied_slots;
             d["zygote_pid"] = st.zygote_pid;
             d["ready"] = st.ready;
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
          [](sb::ZygoteServer& z, std::string work_root, bool drop_uid, uint32_t uid_base, bool drop_capabilities,
             bool seccomp, bool block_inet_sockets, uint64_t as_extra_bytes, uint32_t nproc_extra, bool sweep_orphans,
             bool spares) {
            sb::ZygoteOptions o;
            o.work_root = std::move(work_root);
            o.drop_uid = drop_uid;
            o.uid_base = uid_base;
            o.drop_capabilities = drop_capabilities;
            o.seccomp = seccomp;
            o.block_inet_sockets = block_inet_sockets;
            o.as_extra_bytes = as_extra_bytes;
            o.nproc_extra = nproc_extra;
            o.sweep_orphans = sweep_orphans;
            o.spares = spares;
            z.configure(o);
            return z.sweeping();
          },
          "work_root"_a, "drop_uid"_a, "uid_base"_a, "drop_capabilities"_a, "seccomp"_a, "block_inet_sockets"_a,
          "as_extra_bytes"_a, "nproc_extra"_a, "sweep_orphans"_a, "spares"_a = true)
      .def("send_ready", &sb::ZygoteServer::send_ready, "json"_a, "uses_host_work_root"_a)
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
          "enter_child",
          [](sb::ZygoteServer& z, const sb::ChildRequest& r) {
            sb::ChildProgram p = z.enter_child(r);
            nb::list cells;
            for (auto& c : p.cells) cells.append(nb::bytes(c.data(), c.size()));
            return nb::make_tuple(cells, nb::bytes(p.code.data(), p.code.size()), p.status_fd);
          },
          "request"_a)
      .def_prop_ro("running", &sb::ZygoteServer::running);

  m.def(
      "setup_mounts",
      [](std::vector<std::string> readable, uint64_t tmp_bytes, std::string work_root, bool new_proc) {
        sb::MountReport r = sb::setup_mounts(readable, tmp_bytes, work_root, new_proc);
        nb::dict d;
        d["private_mounts"] = r.private_mounts;
        d["readonly_root"] = r.readonly_root;
        d["private_tmp"] = r.private_tmp;
        d["private_proc"] = r.private_proc;
        d["exposed"] = r.exposed;
        d["warnings"] = r.warnings;
        return d;
      },
      "readable"_a, "tmp_bytes"_a, "work_root"_a, "new_proc"_a);
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
}
