// Isolation primitives: starting the zygote in new namespaces, the filesystem view inside
// them, the per-snippet lock-down done in the forked child, and killing everything a
// snippet started. Everything here degrades: each function reports what it could do.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace cir::sandbox {

// Which namespaces a process was started in.
struct NamespaceSet {
  bool user = false;   // a user namespace (only used when not root)
  bool pid = false;    // the zygote is pid 1 of a new pid namespace
  bool net = false;    // a network namespace with only a (down) loopback device
  bool mount = false;  // a private mount namespace
  bool ipc = false;    // SysV IPC / POSIX message queues
  int clone_flags() const;
  std::string describe() const;  // e.g. "pid,net,mount,ipc"
};

// ---- supervisor side -------------------------------------------------------------------

struct SpawnResult {
  pid_t pid = -1;
  NamespaceSet ns;
  std::string error;  // set when no candidate could be started
};

// Starts the executable at `path` with `argv` and environment `env`, trying the
// namespace sets in `candidates` in order and using the first the kernel accepts. The
// child gets `stdin_fd` on 0, `log_fd` on 1 and 2, `ctrl_fd` on 3, default signal
// dispositions, an empty signal mask, "/" as cwd, and PR_SET_PDEATHSIG(SIGKILL) bound to
// the calling thread. Uses clone(CLONE_VM|CLONE_VFORK): the (large, multithreaded) calling
// process is never copied.
SpawnResult spawn_process(const std::string& path, const std::vector<std::string>& argv,
                          const std::vector<std::string>& env, int stdin_fd, int ctrl_fd, int log_fd,
                          const std::vector<NamespaceSet>& candidates);

// SIGKILLs every process whose real uid is `uid` that the caller can see (in a pid
// namespace: only those inside it), from a short-lived helper that first takes that uid.
// Never acts for uid 0. Returns false if the helper could not take the uid.
bool kill_all_of_uid(uid_t uid, gid_t gid);

// ---- zygote side -----------------------------------------------------------------------

// Which namespaces of those wanted the kernel refuses to create here, e.g.
// "mount namespace (Operation not permitted)"; "" when all can be made. `user`: each inside
// a new user namespace (how a non-root process gets the others).
std::string missing_namespaces(bool user, bool net);
// Whether a child can be cloned with these flags here (e.g. CLONE_NEWIPC).
bool can_clone_with(int flags);

struct IsolationPolicy;

// The filesystem a snippet sees, as the zygote planned it (cir.sandbox.zygote): every path
// is a real host path (no symlink on the way) shown read-only at the same place; symlinks
// met on the way to them are recreated as they are; nothing else exists.
struct RootPlan {
  std::vector<std::string> binds;                            // parents before children, none inside another
  std::vector<std::pair<std::string, std::string>> symlinks;  // (path, target)
  // Directories inside binds covered by an empty one (e.g. a site-packages holding every
  // installed package), and what is shown again on top of them (the preloaded packages).
  std::vector<std::string> masks, inner_binds;
  std::vector<std::string> devices;                          // names under /dev, e.g. "null"
  std::string work_root = "/tmp/cir-work";                   // slot k writes only in work_root/s<k>
  uint32_t slots = 0;
  bool new_proc = true;  // a /proc of the new pid namespace (else the host's, bound)
};

struct RootReport {
  bool ok = false;
  std::string error;                 // what failed (then nothing was changed, or the root could not be entered)
  std::vector<std::string> visible;  // the binds in place
  std::vector<std::string> masked;   // directories shown empty (but for the inner binds)
  std::vector<std::string> devices;
  bool slot_tmpfs = false;  // one capped tmpfs per worker slot
  bool private_proc = false;
  bool chroot = false;      // entered with chroot (no pivot_root possible)
};

// Inside a fresh mount namespace: builds an empty read-only root on a tmpfs holding only
// `plan` (the policy's caps for the work dirs), and makes it this process's root. On a
// failure before the switch everything is undone and `error` says what failed.
RootReport setup_root(const RootPlan& plan, const IsolationPolicy& policy);

// Weaker isolation (accepted explicitly): the host's files stay in view; only a private
// /tmp with the per-slot work tmpfs and a /proc of the pid namespace are mounted.
bool setup_private_tmp(const RootPlan& plan, const IsolationPolicy& policy, std::string* error);

// What sets a snippet process apart from the snippets running beside it, done in the
// process before it drops its privileges: its own IPC namespace (SysV shared memory,
// semaphores and message queues, POSIX message queues: all gone with its last process) and,
// where the kernel has Landlock scopes (ABI >= 6), its own domain (no abstract unix socket
// or signal reaches outside it).
struct SiblingIsolation {
  bool ipc_namespace = false;
  bool landlock = false;
};
// `landlock_ruleset`: from landlock_scope_ruleset() (made once, in the zygote), -1 for none.
SiblingIsolation isolate_from_siblings(int landlock_ruleset);
int landlock_abi();  // 0: no Landlock
int landlock_scope_ruleset();  // a ruleset of the two scopes (an fd), -1 where it cannot be made

// Limits and identity of one snippet process.
struct ChildSpec {
  int stdin_fd = -1, stdout_fd = -1, stderr_fd = -1;
  int status_fd = -1;         // placed at `status_fd_target`, close-on-exec
  int status_fd_target = 255;
  std::string workdir;
  uint64_t as_bytes = 0;  // 0: unlimited
  uint64_t cpu_seconds = 0;
  uint64_t fsize_bytes = 0;
  uint32_t nproc = 0;
  uint32_t nofile = 0;
  bool drop_uid = false;  // setresuid/setresgid to uid/gid (needs root)
  uid_t uid = 0;
  gid_t gid = 0;
  bool drop_capabilities = false;  // root in a user namespace: clear all capabilities
  bool seccomp = true;
  bool block_inet_sockets = false;  // no network namespace: refuse AF_INET/AF_INET6 sockets
};

// Called in the freshly forked child: new session, descriptors (0/1/2 and the status fd;
// everything else closed), work dir, rlimits, uid/gid drop, no-new-privs, seccomp, empty
// signal mask. Returns "" on success, else what failed (the caller must exit: a snippet
// never runs half-isolated).
std::string enter_child(const ChildSpec& spec);

// The seccomp filter alone (exposed for tests). Requires no_new_privs or CAP_SYS_ADMIN.
bool install_seccomp(bool block_inet_sockets, std::string* error);
bool seccomp_supported();

}  // namespace cir::sandbox
