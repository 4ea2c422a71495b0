// The zygote's side of the protocol: a single-threaded loop, driven from Python (which
// does the forking, so the interpreter's own at-fork handling runs), that turns run
// requests into children, reports their start and exit, and cleans up after each one.
//
// To keep fork off a snippet's critical path the zygote keeps one *spare*: a child forked
// ahead of time that blocks until it is handed a request (over a private socket). When a
// request arrives the spare takes it at once and the zygote forks the next spare while the
// snippet runs. Without a spare (start-up, after a failed fork) a child is forked on demand.
//
// Two ways to drive the loop:
// - serve(): the whole loop in C++, forking with fork(2) directly. The zygote then runs no
//   Python between snippets, so it writes to (and copies) almost none of the pages it shares
//   with its children, and its huge pages stay whole. A child returns from serve() with its
//   request; Python's own at-fork handlers are NOT run (the caller runs the ones that matter).
// - next_request() / started() / the spare calls: the reference loop, driven from Python
//   with os.fork (Python's at-fork handling runs as usual).
#pragma once

#include <sys/resource.h>
#include <sys/types.h>

#include <cstdint>
#include <string>
#include <unordered_map>
#include <vector>

#include "sandbox/isolation.h"
#include "sandbox/protocol.h"
#include "sandbox/util.h"

namespace cir::sandbox {

struct ZygoteOptions {
  std::string work_root;     // per-snippet directories are created here
  bool slot_dirs = false;    // work_root/s<k> exists per slot (its own tmpfs); dirs go inside
  bool drop_uid = false;     // slot k runs as uid_base + k (root only)
  uint32_t uid_base = 0;
  bool drop_capabilities = false;  // root inside a user namespace: snippets get no capabilities
  bool seccomp = true;
  bool block_inet_sockets = false;
  bool ipc_per_snippet = false;  // each snippet process takes its own IPC namespace
  bool landlock = false;         // ... and its own Landlock domain (abstract sockets, signals)
  uint64_t as_extra_bytes = 0;  // the zygote's own address space, added to each snippet's budget
  uint32_t nproc_extra = 0;     // added to RLIMIT_NPROC when snippets share the zygote's uid
  bool sweep_orphans = false;   // no per-slot uid: kill the zygote's orphaned children at snippet end
  bool spares = true;           // pre-fork a spare child
};

// What serve() returns in a freshly forked child.
enum class ServeResult {
  Shutdown,  // (in the zygote) the supervisor said goodbye or went away
  Spare,     // a spare: call become_spare() for its request
  Run,       // forked for the request that came with it
};

// One run request, as the process that will run it sees it.
struct ChildRequest {
  proto::RunRequest req{};
  int code_fd = -1, out_fd = -1, err_fd = -1, status_fd = -1;
  std::string workdir;
  uid_t uid = 0;
  gid_t gid = 0;
  int64_t t_start_ns = 0;
  int64_t run_delay_before_ns = 0;  // zygote side: the spare's wait for a CPU before it (-1: unknown)
  bool handed_to_spare = false;  // zygote side: already running in the spare; fork a new spare
};

// What a child runs: replayed session cells (output suppressed) and then the new code.
struct ChildProgram {
  std::vector<std::string> cells;
  std::string code;
  int status_fd = -1;  // where to write proto::StatusRecord
};

// Packs and unpacks the program carried in the code memfd.
std::string pack_program(const std::vector<std::string>& cells, const std::string& code);
bool unpack_program(const std::string& blob, ChildProgram* out);

// Writes one status record (with this process's CPU time and peak RSS) to `fd`.
void write_status_record(int fd, proto::StatusKind kind, int32_t status);

class ZygoteServer {
 public:
  explicit ZygoteServer(int ctrl_fd);
  ~ZygoteServer();

  // Blocking read of the supervisor's Hello (JSON text).
  std::string read_hello();
  // Settles the options (what the machine allows: seccomp, per-snippet IPC namespaces,
  // Landlock scopes) and returns them as they will apply.
  ZygoteOptions configure(const ZygoteOptions& options);
  void send_ready(const std::string& json, bool uses_host_work_root);
  // The zygote cannot isolate as the policy asks: one line for the caller; then it exits.
  void send_refused(const std::string& why);

  // Blocks until the next run request, reaping children and serving kill requests in the
  // meantime. Returns false on shutdown or when the supervisor has gone away. A request
  // taken by the spare comes back with handed_to_spare set (nothing to fork for it).
  bool next_request(ChildRequest* out);
  // After an on-demand fork, in the zygote: remembers the child, closes the request's
  // descriptors, reports the start.
  void started(ChildRequest& r, pid_t pid);
  void start_failed(ChildRequest& r, int error);

  // The native loop (see the top of this file): returns Shutdown in the zygote, Spare or Run
  // (with *out set) in a child. Never returns in the zygote otherwise.
  ServeResult serve(ChildRequest* out);

  // Installs the snippets' seccomp filter on the zygote itself, once: every child inherits
  // it, and enter_child() no longer installs its own. Call after the last mount and before
  // the first child. Returns false (children then install it each) where it cannot be done.
  bool install_seccomp_for_children(std::string* error);
  bool seccomp_inherited() const { return seccomp_inherited_; }

  // Spares: prepare_spare() before fork; in the parent spare_forked(pid) (or
  // spare_fork_failed()); in the child become_spare(), which blocks until a request is
  // handed over (exits quietly if the zygote goes away).
  bool wants_spare() const;
  void prepare_spare();
  void spare_forked(pid_t pid);
  void spare_fork_failed();
  ChildRequest become_spare();

  // In the child: reads the program, locks the process down (see enter_child) and returns
  // what to run. On failure calls fail_setup: a snippet never runs half-isolated.
  ChildProgram enter_child(const ChildRequest& r);
  // In the child, before its code runs: says on stderr what failed, marks the request's code
  // memfd (proto::kSetupFailedMark: the supervisor retries it, the machine's fault) and exits.
  [[noreturn]] void fail_setup(const ChildRequest& r, const std::string& what);

  size_t running() const { return running_.size(); }
  bool sweeping() const { return opt_.sweep_orphans; }

 private:
  struct Running {
    uint64_t req_id;
    uint32_t slot;
    uid_t uid;
    gid_t gid;
    std::string workdir;
  };
  bool hand_to_spare(ChildRequest& r);
  void reap_children();
  void finish(pid_t pid, int status, const struct rusage& ru);
  void kill_snippet(pid_t pid, const Running& r);
  void sweep_orphans();
  void separate_from_siblings();
  void retry_removals();
  void send(const void* msg, size_t len);
  void close_request_fds(ChildRequest& r);

  int ctrl_;
  ZygoteOptions opt_;
  Fd sigfd_;
  Fd stdin_r_, stdin_w_;  // every snippet's stdin: a pipe nobody ever writes to or closes
  std::unordered_map<pid_t, Running> running_;  // by pid (in our pid namespace)
  std::vector<std::string> pending_removals_;
  uint64_t seq_ = 0;
  bool supervisor_gone_ = false;
  // The spare: its pid and our end of its socket (and its end, between prepare and fork).
  pid_t spare_pid_ = -1;
  Fd spare_sock_, spare_child_sock_;
  Fd spare_schedstat_;  // the spare's /proc/<pid>/schedstat
  Fd landlock_ruleset_;  // made once; each snippet process restricts itself with it
  int spare_failures_ = 0;
  bool seccomp_inherited_ = false;
  bool separated_ = false;  // (in a child) isolate_from_siblings() is done
  std::string separate_error_;
};

}  // namespace cir::sandbox
