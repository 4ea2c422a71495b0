#include "sandbox/zygote.h"

#include <fcntl.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <stdexcept>

namespace cir::sandbox {

namespace {
constexpr int kMaxSpareFailures = 3;
}

std::string pack_program(const std::vector<std::string>& cells, const std::string& code) {
  std::string out;
  auto put32 = [&](uint32_t v) { out.append(reinterpret_cast<const char*>(&v), 4); };
  put32(uint32_t(cells.size()));
  for (const auto& c : cells) {
    put32(uint32_t(c.size()));
    out += c;
  }
  put32(uint32_t(code.size()));
  out += code;
  return out;
}

bool unpack_program(const std::string& blob, ChildProgram* out) {
  size_t pos = 0;
  auto get32 = [&](uint32_t* v) {
    if (pos + 4 > blob.size()) return false;
    std::memcpy(v, blob.data() + pos, 4);
    pos += 4;
    return true;
  };
  auto get_str = [&](std::string* s) {
    uint32_t n;
    if (!get32(&n) || pos + n > blob.size()) return false;
    s->assign(blob, pos, n);
    pos += n;
    return true;
  };
  uint32_t ncells;
  if (!get32(&ncells)) return false;
  out->cells.resize(ncells);
  for (auto& c : out->cells)
    if (!get_str(&c)) return false;
  return get_str(&out->code) && pos == blob.size();
}

void write_status_record(int fd, proto::StatusKind kind, int32_t status) {
  proto::StatusRecord rec{};
  rec.kind = kind;
  rec.status = status;
  timespec ts{};
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  struct rusage children {};
  getrusage(RUSAGE_CHILDREN, &children);
  struct rusage self {};
  getrusage(RUSAGE_SELF, &self);
  rec.cpu_ns = int64_t(ts.tv_sec) * 1000000000LL + ts.tv_nsec +
               (int64_t(children.ru_utime.tv_sec) + children.ru_stime.tv_sec) * 1000000000LL +
               (int64_t(children.ru_utime.tv_usec) + children.ru_stime.tv_usec) * 1000LL;
  rec.maxrss_kb = std::max(self.ru_maxrss, children.ru_maxrss);
  rec.t_ns = monotonic_ns();
  rec.run_delay_ns = kind == proto::StatusKind::ReplayDone ? run_delay_of("self") : 0;
  write_all(fd, &rec, sizeof rec);
}

ZygoteServer::ZygoteServer(int ctrl_fd) : ctrl_(ctrl_fd) {
  // Children are reaped through a signalfd; the mask is cleared again in each child.
  sigset_t chld;
  sigemptyset(&chld);
  sigaddset(&chld, SIGCHLD);
  sigprocmask(SIG_BLOCK, &chld, nullptr);
  sigfd_.reset(signalfd(-1, &chld, SFD_CLOEXEC | SFD_NONBLOCK));
  if (!sigfd_.valid()) throw_errno("signalfd");
  int p[2];
  if (pipe2(p, O_CLOEXEC) != 0) throw_errno("pipe2");
  stdin_r_.reset(p[0]);
  stdin_w_.reset(p[1]);
}

ZygoteServer::~ZygoteServer() = default;

std::string ZygoteServer::read_hello() {
  std::string buf(1 << 20, '\0');
  std::vector<int> fds;
  ssize_t n = recv_packet(ctrl_, buf.data(), buf.size(), &fds);
  for (int fd : fds) close(fd);
  if (n < ssize_t(sizeof(proto::Header))) throw std::runtime_error("zygote: no hello from the supervisor");
  proto::Header h;
  std::memcpy(&h, buf.data(), sizeof h);
  if (h.type != proto::Type::Hello || sizeof h + h.length > size_t(n))
    throw std::runtime_error("zygote: malformed hello");
  return buf.substr(sizeof h, h.length);
}

ZygoteOptions ZygoteServer::configure(const ZygoteOptions& options) {
  opt_ = options;
  // The orphan sweep reads our children from /proc: only meaningful if /proc belongs to
  // our pid namespace.
  char link[32] = {0};
  ssize_t n = readlink("/proc/self", link, sizeof link - 1);
  if (n <= 0 || std::strtol(link, nullptr, 10) != long(getpid())) opt_.sweep_orphans = false;
  opt_.seccomp = opt_.seccomp && seccomp_supported();
  if (opt_.ipc_per_snippet) opt_.ipc_per_snippet = can_clone_with(CLONE_NEWIPC);
  if (opt_.landlock && landlock_abi() >= 6) landlock_ruleset_.reset(landlock_scope_ruleset());
  opt_.landlock = landlock_ruleset_.valid();
  return opt_;
}

void ZygoteServer::send(const void* msg, size_t len) {
  if (supervisor_gone_) return;
  if (!send_packet(ctrl_, msg, len, nullptr, 0)) supervisor_gone_ = true;
}

void ZygoteServer::send_ready(const std::string& json, bool uses_host_work_root) {
  proto::Header h{proto::Type::Ready, uint32_t(json.size())};
  uint32_t flags = uses_host_work_root ? proto::kUsesHostWorkRoot : 0;
  std::string msg(reinterpret_cast<const char*>(&h), sizeof h);
  msg.append(reinterpret_cast<const char*>(&flags), sizeof flags);
  msg += json;
  send(msg.data(), msg.size());
}

void ZygoteServer::send_refused(const std::string& why) {
  proto::Header h{proto::Type::Refused, uint32_t(why.size())};
  std::string msg(reinterpret_cast<const char*>(&h), sizeof h);
  msg += why;
  send(msg.data(), msg.size());
}

void ZygoteServer::close_request_fds(ChildRequest& r) {
  for (int* fd : {&r.code_fd, &r.out_fd, &r.err_fd, &r.status_fd}) {
    if (*fd >= 0) close(*fd);
    *fd = -1;
  }
}

bool ZygoteServer::next_request(ChildRequest* out) {
  alignas(8) char buf[4096];
  for (;;) {
    if (supervisor_gone_) return false;
    pollfd fds[2] = {{ctrl_, POLLIN, 0}, {sigfd_.get(), POLLIN, 0}};
    int n = poll(fds, 2, pending_removals_.empty() ? -1 : 100);
    if (n < 0) {
      if (errno == EINTR) continue;
      throw_errno("zygote poll");
    }
    if (n == 0) {
      retry_removals();
      continue;
    }
    if (fds[1].revents) {
      signalfd_siginfo si;
      while (read(sigfd_.get(), &si, sizeof si) == ssize_t(sizeof si)) {
      }
      reap_children();
    }
    if (!fds[0].revents) continue;
    std::vector<int> rfds;
    ssize_t len = recv_packet(ctrl_, buf, sizeof buf, &rfds);
    if (len <= 0) {
      for (int fd : rfds) close(fd);
      if (len < 0 && (errno == EAGAIN || errno == EINTR)) continue;
      supervisor_gone_ = true;
      return false;
    }
    proto::Type type;
    std::memcpy(&type, buf, sizeof type);
    if (type == proto::Type::Shutdown) {
      for (int fd : rfds) close(fd);
      return false;
    }
    if (type == proto::Type::Kill && size_t(len) >= sizeof(proto::KillRequest)) {
      for (int fd : rfds) close(fd);
      proto::KillRequest k;
      std::memcpy(&k, buf, sizeof k);
      for (auto& [pid, r] : running_) {
        if (r.req_id == k.req_id) {
          kill_snippet(pid, r);
          break;
        }
      }
      continue;
    }
    if (type != proto::Type::Run || size_t(len) < sizeof(proto::RunRequest) || rfds.size() < 4) {
      for (int fd : rfds) close(fd);
      continue;
    }
    ChildRequest r;
    std::memcpy(&r.req, buf, sizeof r.req);
    r.code_fd = rfds[0];
    r.out_fd = rfds[1];
    r.err_fd = rfds[2];
    r.status_fd = rfds[3];
    for (size_t i = 4; i < rfds.size(); ++i) close(rfds[i]);
    if (opt_.drop_uid) {
      r.uid = opt_.uid_base + r.req.slot;
      r.gid = opt_.uid_base + r.req.slot;
    } else {
      r.uid = geteuid();
      r.gid = getegid();
    }
    r.workdir = opt_.work_root + "/s" + std::to_string(r.req.slot) + (opt_.slot_dirs ? "/" : "-") + std::to_string(++seq_);
    if (mkdir(r.workdir.c_str(), 0700) != 0 || (opt_.drop_uid && chown(r.workdir.c_str(), r.uid, r.gid) != 0)) {
      start_failed(r, errno);
      continue;
    }
    r.t_start_ns = monotonic_ns();
    if (hand_to_spare(r)) {
      r.handed_to_spare = true;
    }
    *out = std::move(r);
    return true;
  }
}

bool ZygoteServer::hand_to_spare(ChildRequest& r) {
  if (spare_pid_ <= 0 || !spare_sock_.valid()) return false;
  proto::Assignment a{};
  a.req = r.req;
  a.uid = r.uid;
  a.gid = r.gid;
  if (r.workdir.size() >= sizeof a.workdir) return false;
  std::memcpy(a.workdir, r.workdir.c_str(), r.workdir.size() + 1);
  int fds[4] = {r.code_fd, r.out_fd, r.err_fd, r.status_fd};
  pid_t pid = spare_pid_;
  // What the spare waited for a CPU before its request (it sleeps until then): not the snippet's.
  r.run_delay_before_ns = -1;
  if (spare_schedstat_.valid()) {
    char text[96];
    ssize_t n = pread(spare_schedstat_.get(), text, sizeof text - 1, 0);
    unsigned long long on_cpu = 0, waited = 0;
    if (n > 0) {
      text[n] = '\0';
      if (std::sscanf(text, "%llu %llu", &on_cpu, &waited) == 2) r.run_delay_before_ns = int64_t(waited);
    }
    spare_schedstat_.reset();
  }
  bool ok = send_packet(spare_sock_.get(), &a, sizeof a, fds, 4);
  spare_sock_.reset();
  spare_pid_ = -1;
  if (!ok) {
    kill(pid, SIGKILL);  // a spare that cannot take its request is useless; reaped later
    return false;
  }
  spare_failures_ = 0;  // only spares that die unused in a row stop the pre-forking
  started(r, pid);
  return true;
}

void ZygoteServer::started(ChildRequest& r, pid_t pid) {
  running_[pid] = Running{r.req.req_id, r.req.slot, r.uid, r.gid, r.workdir};
  close_request_fds(r);
  // (A child forked for the request has waited for nothing yet.)
  proto::StartedReport s{proto::Type::Started, int32_t(pid), r.req.req_id, r.t_start_ns, r.run_delay_before_ns};
  send(&s, sizeof s);
}

void ZygoteServer::start_failed(ChildRequest& r, int error) {
  close_request_fds(r);
  if (!r.workdir.empty() && !remove_tree(r.workdir)) pending_removals_.push_back(r.workdir);
  proto::FailedReport f{proto::Type::Failed, int32_t(error), r.req.req_id};
  send(&f, sizeof f);
}

ServeResult ZygoteServer::serve(ChildRequest* out) {
  for (;;) {
    if (wants_spare()) {
      prepare_spare();
      pid_t pid = fork();
      if (pid == 0) return ServeResult::Spare;
      if (pid < 0) {
        spare_fork_failed();
      } else {
        spare_forked(pid);
      }
    }
    ChildRequest r;
    if (!next_request(&r)) return ServeResult::Shutdown;
    if (r.handed_to_spare) continue;
    pid_t pid = fork();
    if (pid == 0) {
      *out = std::move(r);
      return ServeResult::Run;
    }
    if (pid < 0) {
      start_failed(r, errno);
    } else {
      started(r, pid);
    }
  }
}

bool ZygoteServer::install_seccomp_for_children(std::string* error) {
  if (!opt_.seccomp) return false;
  if (seccomp_inherited_) return true;
  // Without CAP_SYS_ADMIN the kernel requires no_new_privs first; it only matters for
  // execve, which the zygote never calls (its children set it anyway).
  if (!install_seccomp(opt_.block_inet_sockets, nullptr)) {
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 || !install_seccomp(opt_.block_inet_sockets, error)) return false;
  }
  seccomp_inherited_ = true;
  return true;
}

bool ZygoteServer::wants_spare() const {
  return opt_.spares && spare_pid_ <= 0 && spare_failures_ < kMaxSpareFailures && !supervisor_gone_;
}

void ZygoteServer::prepare_spare() {
  int sv[2];
  if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) != 0) throw_errno("socketpair");
  spare_sock_.reset(sv[0]);
  spare_child_sock_.reset(sv[1]);
}

void ZygoteServer::spare_forked(pid_t pid) {
  spare_child_sock_.reset();
  spare_pid_ = pid;
  // Opened now, read when the spare gets its request (a pread: no path walk then).
  spare_schedstat_.reset(::open(("/proc/" + std::to_string(pid) + "/schedstat").c_str(), O_RDONLY | O_CLOEXEC));
}

void ZygoteServer::spare_fork_failed() {
  spare_child_sock_.reset();
  spare_sock_.reset();
  spare_schedstat_.reset();
  spare_failures_++;
}

ChildRequest ZygoteServer::become_spare() {
  // Nothing of the zygote's plumbing stays open in a snippet process.
  prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0);
  Fd sock(spare_child_sock_.release());
  spare_sock_.reset();
  sigfd_.reset();
  stdin_w_.reset();
  ::close(ctrl_);
  ctrl_ = -1;
  // Set apart from the other snippets now, while nothing waits for this process.
  separate_from_siblings();
  alignas(8) char buf[sizeof(proto::Assignment) + 64];
  std::vector<int> fds;
  ssize_t n = recv_packet(sock.get(), buf, sizeof buf, &fds);
  if (n < ssize_t(sizeof(proto::Assignment)) || fds.size() < 4) _exit(0);  // the zygote went away
  proto::Assignment a;
  std::memcpy(&a, buf, sizeof a);
  ChildRequest r;
  r.req = a.req;
  r.uid = a.uid;
  r.gid = a.gid;
  a.workdir[sizeof a.workdir - 1] = '\0';
  r.workdir = a.workdir;
  r.code_fd = fds[0];
  r.out_fd = fds[1];
  r.err_fd = fds[2];
  r.status_fd = fds[3];
  for (size_t i = 4; i < fds.size(); ++i) close(fds[i]);
  return r;
}

void ZygoteServer::reap_children() {
  for (;;) {
    int status = 0;
    struct rusage ru {};
    pid_t pid = wait4(-1, &status, WNOHANG | __WALL, &ru);
    if (pid <= 0) break;
    if (running_.count(pid)) {
      finish(pid, status, ru);
    } else if (pid == spare_pid_) {
      // The spare died before it was used (e.g. killed from outside): make another.
      spare_pid_ = -1;
      spare_sock_.reset();
      spare_schedstat_.reset();
      spare_failures_++;
    }
    // Anything else is an orphan a snippet left behind, already killed: just reaped.
  }
  retry_removals();
}

void ZygoteServer::kill_snippet(pid_t pid, const Running& r) {
  kill(-pid, SIGKILL);  // its process group (the snippet called setsid: pgid == pid)
  kill(pid, SIGKILL);
  if (opt_.drop_uid) kill_all_of_uid(r.uid, r.gid);  // descendants that left the group
}

void ZygoteServer::finish(pid_t pid, int status, const struct rusage& ru) {
  Running r = running_[pid];
  running_.erase(pid);
  // The snippet is over: nothing it started may outlive it.
  kill(-pid, SIGKILL);
  if (opt_.drop_uid) {
    kill_all_of_uid(r.uid, r.gid);
  } else if (opt_.sweep_orphans) {
    sweep_orphans();
  }
  if (!remove_tree(r.workdir)) pending_removals_.push_back(r.workdir);
  proto::ExitedReport e{};
  e.type = proto::Type::Exited;
  e.wait_status = status;
  e.req_id = r.req_id;
  e.t_end_ns = monotonic_ns();
  e.utime_us = int64_t(ru.ru_utime.tv_sec) * 1000000 + ru.ru_utime.tv_usec;
  e.stime_us = int64_t(ru.ru_stime.tv_sec) * 1000000 + ru.ru_stime.tv_usec;
  e.maxrss_kb = ru.ru_maxrss;
  send(&e, sizeof e);
}

// Without a uid per slot the zygote (pid 1 of its namespace, or a subreaper) inherits every
// process a snippet orphaned; all its children that are neither running snippets nor the
// spare are such orphans. Killing one may orphan its own children to us, hence the rounds.
void ZygoteServer::sweep_orphans() {
  char path[64];
  std::snprintf(path, sizeof path, "/proc/self/task/%ld/children", long(syscall(SYS_gettid)));
  for (int round = 0; round < 64; ++round) {
    std::string text;
    if (!read_file(path, &text)) return;
    std::vector<pid_t> orphans;
    const char* p = text.c_str();
    while (*p) {
      char* end;
      long v = std::strtol(p, &end, 10);
      if (end == p) break;
      if (!running_.count(pid_t(v)) && pid_t(v) != spare_pid_) orphans.push_back(pid_t(v));
      p = end;
    }
    if (orphans.empty()) return;
    for (pid_t o : orphans) kill(o, SIGKILL);
    for (pid_t o : orphans) {
      int st;
      struct rusage ru {};
      while (wait4(o, &st, __WALL, &ru) < 0 && errno == EINTR) {
      }
    }
  }
}

void ZygoteServer::retry_removals() {
  if (pending_removals_.empty()) return;
  std::vector<std::string> still;
  for (const auto& d : pending_removals_)
    if (!remove_tree(d)) still.push_back(d);
  pending_removals_.swap(still);
}

void ZygoteServer::fail_setup(const ChildRequest& r, const std::string& what) {
  // Once the descriptors are in place fd 2 is the snippet's stderr; before that it is the
  // zygote's log. Either way the supervisor sees it. The mark on the code memfd (still open:
  // it is closed only when the set-up succeeds) says it was the machine's fault.
  std::string msg = "cir-sandbox: snippet set-up failed: " + what + "\n";
  write_all(2, msg.data(), msg.size());
  if (r.code_fd >= 0) {
    ssize_t n = pwrite(r.code_fd, proto::kSetupFailedMark, sizeof proto::kSetupFailedMark, 0);
    (void)n;
  }
  _exit(proto::kSetupFailedExit);
}

void ZygoteServer::separate_from_siblings() {
  if (separated_) return;
  separated_ = true;
  SiblingIsolation done = isolate_from_siblings(opt_.landlock ? landlock_ruleset_.get() : -1);
  if (opt_.ipc_per_snippet && !done.ipc_namespace) separate_error_ = errno_message("own IPC namespace");
  if (opt_.landlock && !done.landlock) separate_error_ = errno_message("own Landlock domain");
}

ChildProgram ZygoteServer::enter_child(const ChildRequest& r) {
  ChildProgram prog;
  std::string blob;
  std::string error;
  separate_from_siblings();  // (a spare did it while it waited)
  error = separate_error_;
  if (error.empty() && (!read_whole_fd(r.code_fd, &blob) || !unpack_program(blob, &prog)))
    error = "could not read the snippet";
  ChildSpec spec;
  spec.stdin_fd = stdin_r_.get();
  spec.stdout_fd = r.out_fd;
  spec.stderr_fd = r.err_fd;
  spec.status_fd = r.status_fd;
  // The status pipe sits at the top of the descriptor table, so the snippet's own files
  // get the numbers they would get under python -c.
  uint32_t nofile = r.req.nofile ? r.req.nofile : 1024;
  spec.status_fd_target = int(std::min<uint32_t>(nofile, 1024) - 1);
  spec.workdir = r.workdir;
  spec.as_bytes = r.req.as_bytes ? r.req.as_bytes + opt_.as_extra_bytes : 0;
  spec.cpu_seconds = r.req.cpu_seconds;
  spec.fsize_bytes = r.req.fsize_bytes;
  spec.nproc = r.req.nproc ? r.req.nproc + (opt_.drop_uid ? 0 : opt_.nproc_extra) : 0;
  spec.nofile = r.req.nofile;
  spec.drop_uid = opt_.drop_uid;
  spec.uid = r.uid;
  spec.gid = r.gid;
  spec.drop_capabilities = opt_.drop_capabilities;
  spec.seccomp = opt_.seccomp && !seccomp_inherited_;  // an inherited filter already applies
  spec.block_inet_sockets = opt_.block_inet_sockets;
  if (error.empty()) error = cir::sandbox::enter_child(spec);
  if (!error.empty()) {
    // Once the descriptors are in place fd 2 is the snippet's stderr; before that it is the
    // zygote's log. Either way the supervisor sees it. The status pipe (moved to its final
    // number, or not yet) says it was the machine's fault.
    fail_setup(r, error);
  }
  prog.status_fd = spec.status_fd_target;
  return prog;
}

}  // namespace cir::sandbox
