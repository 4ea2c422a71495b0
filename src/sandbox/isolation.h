// Isolation primitives: starting the zygote in new namespaces, the filesystem view inside
// them, the per-snippet lock-down done in the forked child, and killing everything a
// snippet started. Everything here degrades: each function reports what it could do.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <string>
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

struct MountReport {
  bool private_mounts = false;  // mount events no longer propagate to the host
  bool readonly_root = false;   // every mount (but /dev and /proc) remounted read-only
  bool private_tmp = false;     // fresh tmpfs on /tmp (holding the work dirs) and /dev/shm
  bool private_proc = false;    // /proc shows only the sandbox's pid namespace
  std::vector<std::string> exposed;   // directories re-exposed so the sandbox uid can read Python
  std::vector<std::string> warnings;  // what failed
};

// Inside a fresh mount namespace: makes all mounts private, re-exposes the directories
// listed in `readable` (the Python installation and sys.path) past ancestors that other
// users cannot traverse (e.g. a 0700 /root holding pyenv), remounts everything read-only,
// mounts a private tmpfs of `tmp_bytes` on /tmp with `work_root` (mode 0711) in it, an
// empty read-only tmpfs on /dev/shm, and (with `new_proc`) a /proc of the new pid namespace.
MountReport setup_mounts(const std::vector<std::string>& readable, uint64_t tmp_bytes,
                         const std::string& work_root, bool new_proc);

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
