#include "sandbox/isolation.h"

#include <fcntl.h>
#include <grp.h>
#include <linux/audit.h>
#include <linux/capability.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <sched.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstddef>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <set>

#include "sandbox/policy.h"
#include "sandbox/util.h"

#ifndef CLONE_NEWCGROUP
#define CLONE_NEWCGROUP 0x02000000
#endif
#ifndef SECCOMP_RET_KILL_PROCESS
#define SECCOMP_RET_KILL_PROCESS 0x80000000U
#endif

namespace cir::sandbox {

int NamespaceSet::clone_flags() const {
  return (user ? CLONE_NEWUSER : 0) | (pid ? CLONE_NEWPID : 0) | (net ? CLONE_NEWNET : 0) |
         (mount ? CLONE_NEWNS : 0) | (ipc ? CLONE_NEWIPC : 0);
}

std::string NamespaceSet::describe() const {
  std::string s;
  auto add = [&](bool on, const char* name) {
    if (!on) return;
    if (!s.empty()) s += ",";
    s += name;
  };
  add(user, "user");
  add(pid, "pid");
  add(net, "net");
  add(mount, "mount");
  add(ipc, "ipc");
  return s.empty() ? "none" : s;
}

// ---- clone(CLONE_VM|CLONE_VFORK) helpers ------------------------------------------------
//
// The child shares the caller's memory until it execs or exits, so it may only make raw
// system calls on data prepared beforehand (no malloc, no locks). All signals are blocked
// in the caller around the clone so that no handler runs on the borrowed stack.

namespace {

constexpr size_t kCloneStack = 256 * 1024;

pid_t clone_vfork(int (*fn)(void*), void* arg, int extra_flags) {
  void* stack = mmap(nullptr, kCloneStack, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_STACK, -1, 0);
  if (stack == MAP_FAILED) return -1;
  sigset_t all, old;
  sigfillset(&all);
  pthread_sigmask(SIG_SETMASK, &all, &old);
  pid_t pid = clone(fn, static_cast<char*>(stack) + kCloneStack, CLONE_VM | CLONE_VFORK | SIGCHLD | extra_flags, arg);
  int saved = errno;
  pthread_sigmask(SIG_SETMASK, &old, nullptr);
  munmap(stack, kCloneStack);
  errno = saved;
  return pid;
}

long raw_write_str(int fd, const char* s) { return syscall(SYS_write, fd, s, std::strlen(s)); }

struct SpawnArgs {
  const char* path;
  char* const* argv;
  char* const* envp;
  int stdin_fd, ctrl_fd, log_fd, err_fd;  // err_fd: CLOEXEC pipe that reports a failed exec
  bool write_maps;
  char uid_map[64];
  char gid_map[64];
};

int write_proc_file(const char* path, const char* text) {
  int fd = int(syscall(SYS_openat, AT_FDCWD, path, O_WRONLY | O_CLOEXEC));
  if (fd < 0) return -1;
  long n = raw_write_str(fd, text);
  syscall(SYS_close, fd);
  return n == long(std::strlen(text)) ? 0 : -1;
}

[[noreturn]] void spawn_fail(int err_fd, int code) {
  int e = code;
  syscall(SYS_write, err_fd, &e, sizeof e);
  _exit(127);
}

int spawn_child(void* p) {
  auto* a = static_cast<SpawnArgs*>(p);
  // Move our descriptors out of the way of 0..4 before placing them.
  int ctrl = int(syscall(SYS_fcntl, a->ctrl_fd, F_DUPFD, 100));
  int log = int(syscall(SYS_fcntl, a->log_fd, F_DUPFD, 100));
  int in = int(syscall(SYS_fcntl, a->stdin_fd, F_DUPFD, 100));
  int err = int(syscall(SYS_fcntl, a->err_fd, F_DUPFD_CLOEXEC, 100));
  if (ctrl < 0 || log < 0 || in < 0 || err < 0) _exit(127);
  if (a->write_maps) {
    if (write_proc_file("/proc/self/setgroups", "deny") != 0 && errno != ENOENT) spawn_fail(err, errno);
    if (write_proc_file("/proc/self/uid_map", a->uid_map) != 0) spawn_fail(err, errno);
    if (write_proc_file("/proc/self/gid_map", a->gid_map) != 0) spawn_fail(err, errno);
    // We keep our own (non-zero) uid inside the new user namespace, so exec would drop the
    // namespace capabilities the zygote needs for its mounts: carry the few it needs across
    // exec as ambient capabilities. Its children drop all of them again.
    __user_cap_header_struct hdr{_LINUX_CAPABILITY_VERSION_3, 0};
    __user_cap_data_struct data[2]{};
    if (syscall(SYS_capget, &hdr, data) == 0) {
      data[0].inheritable = data[0].permitted;
      data[1].inheritable = data[1].permitted;
      if (syscall(SYS_capset, &hdr, data) == 0) {
        for (int cap : {CAP_SYS_ADMIN, CAP_SETPCAP}) syscall(SYS_prctl, PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, cap, 0, 0);
      }
    }
  }
  // Inherited "ignore" dispositions would survive exec; the zygote starts like a fresh
  // interpreter. Handlers are per process here (no CLONE_SIGHAND).
  for (int sig = 1; sig < NSIG; ++sig) {
    if (sig == SIGKILL || sig == SIGSTOP) continue;
    struct sigaction sa {};
    sa.sa_handler = SIG_DFL;
    sigaction(sig, &sa, nullptr);
  }
  syscall(SYS_prctl, PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0);
  // Pipes on 0/1/2, so the interpreter sets up its standard streams exactly as a python -c
  // whose output is captured does: the children reuse them.
  if (syscall(SYS_dup3, in, 0, 0) < 0 || syscall(SYS_dup3, log, 1, 0) < 0 || syscall(SYS_dup3, log, 2, 0) < 0 ||
      syscall(SYS_dup3, ctrl, 3, 0) < 0 || syscall(SYS_dup3, err, 4, O_CLOEXEC) < 0)
    spawn_fail(err, errno);
  err = 4;
#ifdef SYS_close_range
  if (syscall(SYS_close_range, 5U, ~0U, 0U) != 0)
#endif
  {
    for (int fd = 5; fd < 65536; ++fd) syscall(SYS_close, fd);
  }
  syscall(SYS_chdir, "/");
  sigset_t none;
  sigemptyset(&none);
  syscall(SYS_rt_sigprocmask, SIG_SETMASK, &none, nullptr, _NSIG / 8);
  syscall(SYS_execve, a->path, a->argv, a->envp);
  spawn_fail(err, errno);
}

int exit_at_once(void*) { _exit(0); }

struct KillArgs {
  uid_t uid;
  gid_t gid;
};

int kill_uid_child(void* p) {
  auto* a = static_cast<KillArgs*>(p);
  if (a->uid == 0) _exit(3);
  if (syscall(SYS_setgroups, 0, nullptr) != 0) _exit(2);
  if (syscall(SYS_setresgid, a->gid, a->gid, a->gid) != 0) _exit(2);
  if (syscall(SYS_setresuid, a->uid, a->uid, a->uid) != 0) _exit(2);
  if (uid_t(syscall(SYS_getuid)) != a->uid || uid_t(syscall(SYS_geteuid)) != a->uid) _exit(3);
  // kill(-1) reaches every process this uid may signal, i.e. those with the same real or
  // saved uid; fork cannot slip past a single pass (the kernel aborts a fork whose parent
  // has a fatal signal pending), the second pass is belt and braces.
  syscall(SYS_kill, -1, SIGKILL);
  syscall(SYS_kill, -1, SIGKILL);
  _exit(0);
}

}  // namespace

SpawnResult spawn_process(const std::string& path, const std::vector<std::string>& argv,
                          const std::vector<std::string>& env, int stdin_fd, int ctrl_fd, int log_fd,
                          const std::vector<NamespaceSet>& candidates) {
  SpawnResult result;
  std::vector<char*> av, ev;
  for (const auto& s : argv) av.push_back(const_cast<char*>(s.c_str()));
  av.push_back(nullptr);
  for (const auto& s : env) ev.push_back(const_cast<char*>(s.c_str()));
  ev.push_back(nullptr);
  std::string errors;
  for (const NamespaceSet& ns : candidates) {
    int pipefd[2];
    if (pipe2(pipefd, O_CLOEXEC) != 0) {
      result.error = errno_message("pipe2");
      return result;
    }
    Fd err_r(pipefd[0]), err_w(pipefd[1]);
    SpawnArgs a{};
    a.path = path.c_str();
    a.argv = av.data();
    a.envp = ev.data();
    a.ctrl_fd = ctrl_fd;
    a.log_fd = log_fd;
    a.stdin_fd = stdin_fd;
    a.err_fd = err_w.get();
    a.write_maps = ns.user;
    std::snprintf(a.uid_map, sizeof a.uid_map, "%u %u 1\n", unsigned(geteuid()), unsigned(geteuid()));
    std::snprintf(a.gid_map, sizeof a.gid_map, "%u %u 1\n", unsigned(getegid()), unsigned(getegid()));
    pid_t pid = clone_vfork(spawn_child, &a, ns.clone_flags());
    if (pid < 0) {
      errors += "[" + ns.describe() + "] " + errno_message("clone") + "; ";
      continue;
    }
    err_w.reset();
    int child_errno = 0;
    ssize_t n = ::read(err_r.get(), &child_errno, sizeof child_errno);
    if (n == ssize_t(sizeof child_errno)) {
      int status;
      waitpid(pid, &status, 0);
      errors += "[" + ns.describe() + "] start failed: " + std::strerror(child_errno) + "; ";
      continue;
    }
    result.pid = pid;
    result.ns = ns;
    return result;
  }
  result.error = errors;
  return result;
}

bool kill_all_of_uid(uid_t uid, gid_t gid) {
  if (uid == 0) return false;
  KillArgs a{uid, gid};
  pid_t pid = clone_vfork(kill_uid_child, &a, 0);
  if (pid < 0) return false;
  int status = 0;
  while (waitpid(pid, &status, __WALL) < 0 && errno == EINTR) {
  }
  return WIFEXITED(status) && WEXITSTATUS(status) == 0;
}

// ---- mounts (zygote) ---------------------------------------------------------------------

namespace {

struct MountEntry {
  int id = 0, parent = 0;
  std::string point;
  bool readonly = false;
};

std::string unescape_mountinfo(const std::string& s) {
  std::string out;
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] == '\\' && i + 3 < s.size()) {
      int v = 0;
      bool ok = true;
      for (int k = 1; k <= 3; ++k) {
        char c = s[i + k];
        if (c < '0' || c > '7') ok = false;
        v = v * 8 + (c - '0');
      }
      if (ok) {
        out += char(v);
        i += 3;
        continue;
      }
    }
    out += s[i];
  }
  return out;
}

std::vector<MountEntry> read_mounts() {
  std::vector<MountEntry> out;
  std::string text;
  if (!read_file("/proc/self/mountinfo", &text)) return out;
  size_t pos = 0;
  while (pos < text.size()) {
    size_t end = text.find('\n', pos);
    if (end == std::string::npos) end = text.size();
    std::string line = text.substr(pos, end - pos);
    pos = end + 1;
    // id parent major:minor root mountpoint options ...
    std::vector<std::string> f;
    size_t a = 0;
    while (a < line.size() && f.size() < 6) {
      size_t b = line.find(' ', a);
      if (b == std::string::npos) b = line.size();
      f.push_back(line.substr(a, b - a));
      a = b + 1;
    }
    if (f.size() < 6) continue;
    MountEntry e;
    e.id = std::atoi(f[0].c_str());
    e.parent = std::atoi(f[1].c_str());
    e.point = unescape_mountinfo(f[4]);
    e.readonly = (f[5] == "ro" || f[5].rfind("ro,", 0) == 0);
    out.push_back(e);
  }
  return out;
}

bool under(const std::string& path, const std::string& dir) {
  if (dir == "/") return true;
  return path == dir || (path.size() > dir.size() && path.compare(0, dir.size(), dir) == 0 && path[dir.size()] == '/');
}

unsigned long preserved_flags(const std::string& point) {
  struct statvfs sv {};
  if (statvfs(point.c_str(), &sv) != 0) return 0;
  unsigned long f = 0;
  if (sv.f_flag & ST_NOSUID) f |= MS_NOSUID;
  if (sv.f_flag & ST_NODEV) f |= MS_NODEV;
  if (sv.f_flag & ST_NOEXEC) f |= MS_NOEXEC;
  if (sv.f_flag & ST_NOATIME) f |= MS_NOATIME;
  if (sv.f_flag & ST_NODIRATIME) f |= MS_NODIRATIME;
  if (sv.f_flag & ST_RELATIME) f |= MS_RELATIME;
  return f;
}

bool mkdir_p(const std::string& path, mode_t mode) {
  std::string cur;
  size_t pos = 1;
  while (pos <= path.size()) {
    size_t next = path.find('/', pos);
    if (next == std::string::npos) next = path.size();
    cur = path.substr(0, next);
    if (!cur.empty() && mkdir(cur.c_str(), mode) != 0 && errno != EEXIST) return false;
    pos = next + 1;
  }
  return true;
}

std::string parent_of(const std::string& path) {
  size_t slash = path.find_last_of('/');
  return slash == 0 || slash == std::string::npos ? "/" : path.substr(0, slash);
}

// An empty file or directory to mount `source` on, like it.
bool make_mountpoint(const std::string& target, bool directory) {
  if (!mkdir_p(parent_of(target), 0755)) return false;
  if (directory) return mkdir(target.c_str(), 0755) == 0 || errno == EEXIST;
  int fd = ::open(target.c_str(), O_CREAT | O_WRONLY | O_CLOEXEC, 0644);
  if (fd < 0) return errno == EEXIST;
  ::close(fd);
  return true;
}

}  // namespace

RootReport setup_root(const RootPlan& plan, const IsolationPolicy& policy) {
  RootReport r;
  auto fatal = [&](const std::string& what) {
    r.error = errno_message(what);
    return r;
  };
  // The new root is assembled on a tmpfs mounted over /tmp (in our own mount namespace
  // only), then made the root with pivot_root. Paths under the host's /tmp are reached
  // through a handle taken before it is covered.
  const std::string stage = "/tmp";
  struct stat st {};
  if (lstat(stage.c_str(), &st) != 0 || !S_ISDIR(st.st_mode)) return fatal("the host has no /tmp directory to build the root on");
  std::vector<std::string> all = plan.binds;
  all.insert(all.end(), plan.inner_binds.begin(), plan.inner_binds.end());
  for (const std::string& path : all) {
    if (path.empty() || path[0] != '/' || path == "/") {
      r.error = "cannot show \"" + path + "\": not an absolute path below /";
      return r;
    }
    if (stat(path.c_str(), &st) != 0) return fatal("cannot show " + path);
  }
  if (mount(nullptr, "/", nullptr, MS_REC | MS_PRIVATE, nullptr) != 0) return fatal("make mounts private");
  Fd host_tmp(::open(stage.c_str(), O_PATH | O_DIRECTORY | O_CLOEXEC));
  if (!host_tmp.valid()) return fatal("open /tmp");
  if (mount("cir-sandbox-root", stage.c_str(), "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=4m,nr_inodes=65536") != 0)
    return fatal("mount the root tmpfs");
  auto undo = [&](const std::string& what) {
    r.error = errno_message(what);
    umount2(stage.c_str(), MNT_DETACH);  // everything mounted below goes with it
    r.visible.clear();
    return r;
  };
  auto in_root = [&](const std::string& path) { return stage + path; };
  auto source = [&](const std::string& path) {
    if (!under(path, "/tmp")) return path;
    return "/proc/self/fd/" + std::to_string(host_tmp.get()) + path.substr(4);
  };

  // 1. What the interpreter needs, read-only, each at the path it has on the host; package
  // directories inside them emptied, with the preloaded packages shown again on top.
  auto show = [&](const std::string& path) {
    std::string src = source(path);
    if (stat(src.c_str(), &st) != 0) return false;
    std::string dst = in_root(path);
    if (!make_mountpoint(dst, S_ISDIR(st.st_mode))) return false;
    if (mount(src.c_str(), dst.c_str(), nullptr, MS_BIND | MS_REC, nullptr) != 0) return false;
    r.visible.push_back(path);
    return true;
  };
  for (const std::string& path : plan.binds)
    if (!show(path)) return undo("show " + path);
  for (const std::string& path : plan.masks) {
    if (mount("cir-sandbox-mask", in_root(path).c_str(), "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=1m") != 0)
      return undo("cover " + path);
    r.masked.push_back(path);
  }
  for (const std::string& path : plan.inner_binds)
    if (!show(path)) return undo("show " + path);
  for (const auto& [path, target] : plan.symlinks) {
    std::string dst = in_root(path);
    if (!mkdir_p(parent_of(dst), 0755)) return undo("directory for " + path);
    if (symlink(target.c_str(), dst.c_str()) != 0 && errno != EEXIST) return undo("symlink " + path);
  }

  // 2. The few device nodes Python uses, and the usual links to a process's own descriptors.
  const std::string dev = in_root("/dev");
  if (!mkdir_p(dev + "/shm", 0755)) return undo("mkdir /dev");
  for (const std::string& name : plan.devices) {
    std::string host = "/dev/" + name;
    if (stat(host.c_str(), &st) != 0 || !S_ISCHR(st.st_mode)) continue;
    std::string dst = dev + "/" + name;
    if (!make_mountpoint(dst, false)) return undo("mountpoint for " + host);
    if (mount(host.c_str(), dst.c_str(), nullptr, MS_BIND, nullptr) != 0) return undo("bind " + host);
    mount(nullptr, dst.c_str(), nullptr, MS_REMOUNT | MS_BIND | MS_NOSUID | MS_NOEXEC | preserved_flags(dst), nullptr);
    r.devices.push_back(host);
  }
  const char* links[][2] = {
      {"fd", "/proc/self/fd"}, {"stdin", "/proc/self/fd/0"}, {"stdout", "/proc/self/fd/1"}, {"stderr", "/proc/self/fd/2"}};
  for (auto& link : links) symlink(link[1], (dev + "/" + link[0]).c_str());

  // 3. /tmp holds the work root: one tmpfs per worker slot, so that the bytes and files one
  // snippet writes count against its own slot's caps, never a neighbour's.
  const std::string work = in_root(plan.work_root);
  if (!mkdir_p(work, 0755)) return undo("mkdir " + plan.work_root);
  chmod(work.c_str(), 0711);  // the slots' directories cannot be listed
  char opts[160];
  std::snprintf(opts, sizeof opts, "mode=0711,size=%llu,nr_inodes=%llu", (unsigned long long)policy.work_dir_bytes,
                (unsigned long long)policy.work_dir_inodes);
  for (uint32_t k = 0; k < plan.slots; ++k) {
    std::string dir = work + "/s" + std::to_string(k);
    if (mkdir(dir.c_str(), 0711) != 0 && errno != EEXIST) return undo("mkdir " + dir);
    if (mount("cir-sandbox-work", dir.c_str(), "tmpfs", MS_NOSUID | MS_NODEV, opts) != 0)
      return undo("mount the work tmpfs of slot " + std::to_string(k));
  }
  r.slot_tmpfs = true;

  // 4. /proc: the new pid namespace's (mounted while the host's is still in view, which a
  // user namespace requires).
  const std::string proc = in_root("/proc");
  if (mkdir(proc.c_str(), 0555) != 0 && errno != EEXIST) return undo("mkdir /proc");
  if (plan.new_proc) {
    if (mount("proc", proc.c_str(), "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, nullptr) != 0) return undo("mount /proc");
    r.private_proc = true;
  } else if (mount("/proc", proc.c_str(), nullptr, MS_BIND | MS_REC, nullptr) != 0) {
    return undo("bind /proc");
  }

  // 5. Every bind read-only (recursive binds bring their submounts, each remounted). Only
  // mounts of the new root's tree: host mounts below /tmp are hidden under it, not in it.
  std::vector<MountEntry> mounts = read_mounts();
  std::set<int> tree;
  for (const MountEntry& m : mounts)
    if (m.point == stage) tree = {m.id};  // the last one listed is the top of the stack: ours
  for (bool grew = true; grew;) {
    grew = false;
    for (const MountEntry& m : mounts) {
      if (tree.count(m.parent) && !tree.count(m.id)) {
        tree.insert(m.id);
        grew = true;
      }
    }
  }
  for (const MountEntry& m : mounts) {
    if (!tree.count(m.id) || m.point == stage) continue;
    if (under(m.point, proc) || under(m.point, dev) || under(m.point, work)) continue;
    unsigned long flags = MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV | preserved_flags(m.point);
    if (!m.readonly && mount(nullptr, m.point.c_str(), nullptr, flags, nullptr) != 0)
      return undo("remount read-only " + m.point);
  }

  // 6. Into the new root; the old one is detached. Where pivot_root is not possible (an
  // initramfs root), the new root is moved over the old one and entered with chroot.
  const std::string old = stage + "/.old-root";
  if (mkdir(old.c_str(), 0700) != 0) return undo("mkdir for the old root");
  if (syscall(SYS_pivot_root, stage.c_str(), old.c_str()) == 0) {
    if (chdir("/") != 0) return fatal("chdir /");
    if (umount2("/.old-root", MNT_DETACH) != 0) return fatal("detach the old root");
    rmdir("/.old-root");
  } else {
    rmdir(old.c_str());
    if (chdir(stage.c_str()) != 0 || mount(".", "/", nullptr, MS_MOVE, nullptr) != 0 || chroot(".") != 0 ||
        chdir("/") != 0)
      return fatal("enter the new root");
    r.chroot = true;
  }
  if (mount(nullptr, "/", nullptr, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV, nullptr) != 0)
    return fatal("remount the root read-only");
  r.ok = true;
  return r;
}

bool setup_private_tmp(const RootPlan& plan, const IsolationPolicy& policy, std::string* error) {
  auto fail = [&](const std::string& what) {
    if (error) *error = errno_message(what);
    return false;
  };
  if (mount(nullptr, "/", nullptr, MS_REC | MS_PRIVATE, nullptr) != 0) return fail("make mounts private");
  if (mount("cir-sandbox-tmp", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=1m") != 0)
    return fail("mount tmpfs on /tmp");
  if (!mkdir_p(plan.work_root, 0711)) return fail("mkdir " + plan.work_root);
  char opts[160];
  std::snprintf(opts, sizeof opts, "mode=0711,size=%llu,nr_inodes=%llu", (unsigned long long)policy.work_dir_bytes,
                (unsigned long long)policy.work_dir_inodes);
  for (uint32_t k = 0; k < plan.slots; ++k) {
    std::string dir = plan.work_root + "/s" + std::to_string(k);
    if ((mkdir(dir.c_str(), 0711) != 0 && errno != EEXIST) ||
        mount("cir-sandbox-work", dir.c_str(), "tmpfs", MS_NOSUID | MS_NODEV, opts) != 0)
      return fail("work tmpfs of slot " + std::to_string(k));
  }
  if (plan.new_proc && mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, nullptr) != 0)
    return fail("mount /proc");
  return true;
}

bool can_clone_with(int flags) {
  pid_t pid = clone_vfork(exit_at_once, nullptr, flags);
  if (pid < 0) return false;
  int status;
  while (waitpid(pid, &status, __WALL) < 0 && errno == EINTR) {
  }
  return true;
}

std::string missing_namespaces(bool user, bool net) {
  struct Kind {
    int flag;
    const char* name;
    bool wanted;
  };
  const Kind kinds[] = {{CLONE_NEWUSER, "user namespace", user}, {CLONE_NEWNS, "mount namespace", true},
                        {CLONE_NEWPID, "pid namespace", true},   {CLONE_NEWIPC, "IPC namespace", true},
                        {CLONE_NEWNET, "network namespace", net}};
  std::string missing;
  for (const Kind& k : kinds) {
    if (!k.wanted) continue;
    if (can_clone_with(k.flag | (user ? CLONE_NEWUSER : 0))) continue;
    if (!missing.empty()) missing += ", ";
    missing += std::string(k.name) + " (" + std::strerror(errno) + ")";
  }
  return missing;
}

// ---- child (after fork in the zygote) ------------------------------------------------------

bool seccomp_supported() {
#if defined(__x86_64__) || defined(__aarch64__)
  return prctl(PR_GET_SECCOMP, 0, 0, 0, 0) >= 0;
#else
  return false;
#endif
}

bool install_seccomp(bool block_inet_sockets, std::string* error) {
#if defined(__x86_64__)
  const uint32_t arch = AUDIT_ARCH_X86_64;
#elif defined(__aarch64__)
  const uint32_t arch = AUDIT_ARCH_AARCH64;
#else
  if (error) *error = "seccomp: unsupported architecture";
  return false;
#endif
#if defined(__x86_64__) || defined(__aarch64__)
  const uint32_t kEperm = SECCOMP_RET_ERRNO | (EPERM & SECCOMP_RET_DATA);
  const uint32_t kEnosys = SECCOMP_RET_ERRNO | (ENOSYS & SECCOMP_RET_DATA);
  const uint32_t kEacces = SECCOMP_RET_ERRNO | (EACCES & SECCOMP_RET_DATA);
  std::vector<sock_filter> prog;
  auto stmt = [&](uint16_t code, uint32_t k) { prog.push_back(BPF_STMT(code, k)); };
  auto jump = [&](uint16_t code, uint32_t k, uint8_t jt, uint8_t jf) { prog.push_back(BPF_JUMP(code, k, jt, jf)); };
  const uint32_t off_arch = offsetof(seccomp_data, arch);
  const uint32_t off_nr = offsetof(seccomp_data, nr);
  const uint32_t off_arg0 = offsetof(seccomp_data, args[0]);  // low 32 bits (little endian)

  stmt(BPF_LD | BPF_W | BPF_ABS, off_arch);
  jump(BPF_JMP | BPF_JEQ | BPF_K, arch, 1, 0);
  stmt(BPF_RET | BPF_K, SECCOMP_RET_KILL_PROCESS);  // foreign ABI (e.g. int 0x80): no way around
  stmt(BPF_LD | BPF_W | BPF_ABS, off_nr);
#if defined(__x86_64__)
  jump(BPF_JMP | BPF_JGE | BPF_K, 0x40000000U, 0, 1);  // x32 ABI
  stmt(BPF_RET | BPF_K, kEperm);
#endif
  // Namespaces, mounts, kernel attack surface a snippet has no business with.
  // unshare(CLONE_NEWIPC) alone is let through: each snippet process takes its own IPC
  // namespace while it still may (ZygoteServer), and needs CAP_SYS_ADMIN for it, which a
  // snippet never has. Every other unshare is refused below.
  jump(BPF_JMP | BPF_JEQ | BPF_K, uint32_t(SYS_unshare), 0, 3);
  stmt(BPF_LD | BPF_W | BPF_ABS, off_arg0);
  jump(BPF_JMP | BPF_JEQ | BPF_K, uint32_t(CLONE_NEWIPC), 0, 1);
  stmt(BPF_RET | BPF_K, SECCOMP_RET_ALLOW);
  stmt(BPF_LD | BPF_W | BPF_ABS, off_nr);  // (restore the syscall number for the checks below)
  const long denied[] = {
      SYS_unshare, SYS_setns, SYS_mount, SYS_umount2, SYS_pivot_root, SYS_chroot, SYS_bpf, SYS_perf_event_open,
      SYS_userfaultfd, SYS_keyctl, SYS_add_key, SYS_request_key, SYS_kexec_load, SYS_init_module,
      SYS_finit_module, SYS_delete_module, SYS_reboot, SYS_swapon, SYS_swapoff, SYS_acct,
#ifdef SYS_io_uring_setup
      SYS_io_uring_setup, SYS_io_uring_enter, SYS_io_uring_register,  // io_uring ops bypass seccomp
#endif
#ifdef SYS_open_tree
      SYS_open_tree, SYS_move_mount, SYS_fsopen, SYS_fsconfig, SYS_fsmount, SYS_fspick,
#endif
#ifdef SYS_mount_setattr
      SYS_mount_setattr,
#endif
  };
  for (long nr : denied) {
    jump(BPF_JMP | BPF_JEQ | BPF_K, uint32_t(nr), 0, 1);
    stmt(BPF_RET | BPF_K, kEperm);
  }
#ifdef SYS_clone3
  // clone3 passes its flags in memory the filter cannot read: make libc fall back to clone.
  jump(BPF_JMP | BPF_JEQ | BPF_K, uint32_t(SYS_clone3), 0, 1);
  stmt(BPF_RET | BPF_K, kEnosys);
#endif
  const uint32_t ns_flags = CLONE_NEWNS | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWUSER | CLONE_NEWPID | CLONE_NEWNET |
                            CLONE_NEWCGROUP;
  jump(BPF_JMP | BPF_JEQ | BPF_K, uint32_t(SYS_clone), 0, 4);
  stmt(BPF_LD | BPF_W | BPF_ABS, off_arg0);
  jump(BPF_JMP | BPF_JSET | BPF_K, ns_flags, 0, 1);
  stmt(BPF_RET | BPF_K, kEperm);
  stmt(BPF_RET | BPF_K, SECCOMP_RET_ALLOW);
  if (block_inet_sockets) {
    jump(BPF_JMP | BPF_JEQ | BPF_K, uint32_t(SYS_socket), 0, 5);
    stmt(BPF_LD | BPF_W | BPF_ABS, off_arg0);
    jump(BPF_JMP | BPF_JEQ | BPF_K, AF_INET, 2, 0);
    jump(BPF_JMP | BPF_JEQ | BPF_K, AF_INET6, 1, 0);
    stmt(BPF_RET | BPF_K, SECCOMP_RET_ALLOW);
    stmt(BPF_RET | BPF_K, kEacces);
  }
  stmt(BPF_RET | BPF_K, SECCOMP_RET_ALLOW);

  sock_fprog fprog{};
  fprog.len = static_cast<unsigned short>(prog.size());
  fprog.filter = prog.data();
  if (prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &fprog, 0, 0) != 0) {
    if (error) *error = errno_message("seccomp");
    return false;
  }
  return true;
#endif
}

namespace {

// Landlock (Linux 6.12+, ABI 6): a domain's processes may not connect to abstract unix
// sockets, nor signal processes, outside their own domain. Not in older headers.
constexpr uint64_t kScopeAbstractUnixSocket = 1ULL << 0;
constexpr uint64_t kScopeSignal = 1ULL << 1;
constexpr uint32_t kCreateRulesetVersion = 1U << 0;
struct LandlockRulesetAttr {
  uint64_t handled_access_fs;
  uint64_t handled_access_net;
  uint64_t scoped;
};
#ifndef SYS_landlock_create_ruleset
#define SYS_landlock_create_ruleset 444
#define SYS_landlock_restrict_self 446
#endif

}  // namespace

int landlock_abi() {
  long abi = syscall(SYS_landlock_create_ruleset, nullptr, 0, kCreateRulesetVersion);
  return abi < 0 ? 0 : int(abi);
}

int landlock_scope_ruleset() {
  LandlockRulesetAttr attr{0, 0, kScopeAbstractUnixSocket | kScopeSignal};
  long fd = syscall(SYS_landlock_create_ruleset, &attr, sizeof attr, 0U);  // close-on-exec
  return fd < 0 ? -1 : int(fd);
}

SiblingIsolation isolate_from_siblings(int landlock_ruleset) {
  SiblingIsolation done;
  done.ipc_namespace = unshare(CLONE_NEWIPC) == 0;
  if (landlock_ruleset >= 0) done.landlock = syscall(SYS_landlock_restrict_self, landlock_ruleset, 0U) == 0;
  return done;
}

namespace {

std::string fail(const std::string& what) { return errno_message(what); }

bool set_limit(int resource, rlim_t soft, rlim_t hard) {
  rlimit rl{soft, hard};
  return setrlimit(resource, &rl) == 0;
}

}  // namespace

std::string enter_child(const ChildSpec& s) {
  if (setsid() < 0) return fail("setsid");
  // If the zygote dies, so does the snippet (belt and braces next to the pid namespace).
  prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0);

  // Descriptors: park the sources above the targets, then place them.
  int park = std::max(10, s.status_fd_target + 1);
  int in = fcntl(s.stdin_fd, F_DUPFD_CLOEXEC, park);
  int out = fcntl(s.stdout_fd, F_DUPFD_CLOEXEC, park);
  int err = fcntl(s.stderr_fd, F_DUPFD_CLOEXEC, park);
  int status = s.status_fd >= 0 ? fcntl(s.status_fd, F_DUPFD_CLOEXEC, park) : -1;
  if (in < 0 || out < 0 || err < 0 || (s.status_fd >= 0 && status < 0)) return fail("dup");
  if (dup2(in, 0) < 0 || dup2(out, 1) < 0 || dup2(err, 2) < 0) return fail("dup2");
  if (status >= 0 && dup3(status, s.status_fd_target, O_CLOEXEC) < 0) return fail("dup3 status");
  auto close_from_to = [](unsigned first, unsigned last) {
    if (first > last) return;
#ifdef SYS_close_range
    if (syscall(SYS_close_range, first, last, 0U) == 0) return;
#endif
    rlimit rl{};
    getrlimit(RLIMIT_NOFILE, &rl);
    unsigned top = rl.rlim_cur == RLIM_INFINITY || rl.rlim_cur > 1048576 ? 1048576U : unsigned(rl.rlim_cur);
    for (unsigned fd = first; fd <= last && fd < top; ++fd) close(int(fd));
  };
  if (status >= 0) {
    close_from_to(3, unsigned(s.status_fd_target) - 1);
    close_from_to(unsigned(s.status_fd_target) + 1, ~0U);
  } else {
    close_from_to(3, ~0U);
  }

  if (chdir(s.workdir.c_str()) != 0) return fail("chdir " + s.workdir);
  umask(022);

  if (s.as_bytes && !set_limit(RLIMIT_AS, s.as_bytes, s.as_bytes)) return fail("RLIMIT_AS");
  if (s.cpu_seconds && !set_limit(RLIMIT_CPU, s.cpu_seconds, s.cpu_seconds + 1)) return fail("RLIMIT_CPU");
  if (s.fsize_bytes && !set_limit(RLIMIT_FSIZE, s.fsize_bytes, s.fsize_bytes)) return fail("RLIMIT_FSIZE");
  if (s.nofile && !set_limit(RLIMIT_NOFILE, s.nofile, s.nofile)) return fail("RLIMIT_NOFILE");
  if (s.nproc && !set_limit(RLIMIT_NPROC, s.nproc, s.nproc)) return fail("RLIMIT_NPROC");
  if (!set_limit(RLIMIT_CORE, 0, 0)) return fail("RLIMIT_CORE");

  if (s.drop_uid) {
    if (s.uid == 0 || s.gid == 0) return "refusing to run a snippet as root";
    if (setgroups(0, nullptr) != 0) return fail("setgroups");
    if (setresgid(s.gid, s.gid, s.gid) != 0) return fail("setresgid");
    if (setresuid(s.uid, s.uid, s.uid) != 0) return fail("setresuid");
    uid_t ru, eu, su;
    gid_t rg, eg, sg;
    if (getresuid(&ru, &eu, &su) != 0 || getresgid(&rg, &eg, &sg) != 0 || ru != s.uid || eu != s.uid ||
        su != s.uid || rg != s.gid || eg != s.gid || sg != s.gid)
      return "uid/gid drop did not take effect";
    // Changing uid made the process non-dumpable, which would hide its own /proc/self
    // from it; core dumps stay off through RLIMIT_CORE.
    prctl(PR_SET_DUMPABLE, 1, 0, 0, 0);
  } else if (s.drop_capabilities) {
    for (int cap = 0; cap <= 63; ++cap) prctl(PR_CAPBSET_DROP, cap, 0, 0, 0);
    __user_cap_header_struct hdr{_LINUX_CAPABILITY_VERSION_3, 0};
    __user_cap_data_struct data[2]{};
    if (syscall(SYS_capset, &hdr, data) != 0) return fail("capset");
  }
  if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0) return fail("no_new_privs");
  if (s.seccomp) {
    std::string e;
    if (!install_seccomp(s.block_inet_sockets, &e)) return e;
  }
  sigset_t none;
  sigemptyset(&none);
  sigprocmask(SIG_SETMASK, &none, nullptr);
  return "";
}

}  // namespace cir::sandbox
