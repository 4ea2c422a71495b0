#include "sandbox/supervisor.h"

#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <set>
#include <stdexcept>

#include "sandbox/protocol.h"
#include "sandbox/util.h"
#include "sandbox/zygote.h"

namespace cir::sandbox {

namespace {

constexpr size_t kLogTail = 16 * 1024;
constexpr int64_t kExitGraceNs = 2'000'000'000;  // after the exit report, wait this long for EOF
// A deadline extended for time the snippet spent waiting for a CPU is looked at again no
// sooner than this.
constexpr int64_t kMinRecheckNs = 5'000'000;

int64_t seconds_ns(double s) { return int64_t(s * 1e9); }

std::string json_string(const std::string& s) {
  std::string o = "\"";
  for (unsigned char c : s) {
    if (c == '"' || c == '\\') {
      o += '\\';
      o += char(c);
    } else if (c < 0x20) {
      char b[8];
      std::snprintf(b, sizeof b, "\\u%04x", c);
      o += b;
    } else {
      o += char(c);
    }
  }
  return o + "\"";
}

const char* json_bool(bool b) { return b ? "true" : "false"; }

std::string last_line(const std::string& text) {
  size_t end = text.find_last_not_of("\n \t");
  if (end == std::string::npos) return "";
  size_t start = text.rfind('\n', end);
  return text.substr(start == std::string::npos ? 0 : start + 1, end + 1 - (start == std::string::npos ? 0 : start + 1));
}

uint32_t choose_uid_base() {
  static std::atomic<uint32_t> counter{0};
  uint64_t h = uint64_t(getpid()) * 0x9E3779B97F4A7C15ULL ^ (uint64_t(counter++) << 32) ^ uint64_t(monotonic_ns());
  h ^= h >> 29;
  h *= 0xBF58476D1CE4E5B9ULL;
  h ^= h >> 32;
  // 2,000,000,000 + k * 1024: far above any real account or subuid range.
  return 2000000000U + uint32_t(h % 1000000ULL) * 1024U;
}

void wake(int fd) {
  uint64_t one = 1;
  ssize_t n = ::write(fd, &one, sizeof one);
  (void)n;
}

void drain_eventfd(int fd) {
  uint64_t v;
  while (::read(fd, &v, sizeof v) > 0) {
  }
}

}  // namespace

Supervisor::Supervisor(SupervisorOptions options) : opt_(std::move(options)) {
  if (opt_.workers < 1) throw std::invalid_argument("workers must be >= 1");
  if (opt_.workers > 512) throw std::invalid_argument("workers must be <= 512");
  if (opt_.zygote_argv.empty()) throw std::invalid_argument("zygote_argv is empty");
  if (opt_.fault_attempts < 1) throw std::invalid_argument("fault_attempts must be >= 1");
  if (opt_.unavailable_after < 1) throw std::invalid_argument("unavailable_after must be >= 1");
  if (!(opt_.wall_guard_factor >= 1)) throw std::invalid_argument("wall_guard_factor must be >= 1");
  if (!(opt_.wall_guard_extra_s >= 0)) throw std::invalid_argument("wall_guard_extra_s must be >= 0");
  policy_ = IsolationPolicy::from_json(opt_.policy_json);
  if (opt_.uid_base == 0) opt_.uid_base = choose_uid_base();
  slots_.assign(size_t(opt_.workers) * 2, nullptr);
  epoll_.reset(epoll_create1(EPOLL_CLOEXEC));
  wake_fd_.reset(eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  notify_fd_.reset(eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  if (!epoll_.valid() || !wake_fd_.valid() || !notify_fd_.valid()) throw_errno("epoll/eventfd");
  epoll_add(wake_fd_.get(), &w_wake_);
  // The zygote is spawned from the I/O thread: PR_SET_PDEATHSIG is tied to the thread that
  // created it, and this thread lives exactly as long as the sandbox.
  thread_ = std::thread([this] { io_loop(); });
}

Supervisor::~Supervisor() { close(); }

void Supervisor::epoll_add(int fd, Watch* w) {
  epoll_event ev{};
  ev.events = EPOLLIN;
  ev.data.ptr = w;
  epoll_ctl(epoll_.get(), EPOLL_CTL_ADD, fd, &ev);
}

void Supervisor::epoll_del(int fd) {
  if (fd >= 0) epoll_ctl(epoll_.get(), EPOLL_CTL_DEL, fd, nullptr);
}

bool Supervisor::wait_ready(double timeout_s, std::string* error) {
  std::unique_lock<std::mutex> lk(mu_);
  auto until = std::chrono::steady_clock::now() + std::chrono::duration<double>(timeout_s);
  bool ok = ready_cv_.wait_until(lk, until, [&] {
    return ever_ready_ || zstate_ == ZState::Refused || failed_starts_ >= opt_.unavailable_after || closed_;
  });
  if (ok && ever_ready_) return true;
  if (error) {
    if (zstate_ == ZState::Refused)
      *error = refusal_;
    else if (closed_)
      *error = "sandbox closed";
    else if (failed_starts_ >= opt_.unavailable_after)
      *error = unavailable_message();
    else
      *error = "the sandbox interpreter did not become ready within " + std::to_string(timeout_s) + " s";
    if (zstate_ != ZState::Refused && !log_tail_.empty()) *error += "\n--- zygote stderr ---\n" + log_tail_;
  }
  return false;
}

std::string Supervisor::unavailable_message() const {
  char wait[32];
  double next = std::max(0.0, double(restart_at_ns_ - monotonic_ns()) / 1e9);
  std::snprintf(wait, sizeof wait, "%.1f", next);
  return "the sandbox is unavailable: its interpreter failed to start " + std::to_string(failed_starts_) +
         " times in a row (last: " + last_start_error_ + "); the next try is in " + wait + " s";
}

uint64_t Supervisor::submit(Job job) {
  std::lock_guard<std::mutex> lk(mu_);
  if (closing_ || closed_) throw std::runtime_error("sandbox is closed");
  if (zstate_ == ZState::Refused) throw std::runtime_error(refusal_);
  if (failed_starts_ >= opt_.unavailable_after) {
    stats_.unavailable++;
    throw std::runtime_error(unavailable_message());
  }
  auto r = std::make_shared<Request>();
  r->id = next_id_++;
  r->job = std::move(job);
  r->w_out.req = r->w_err.req = r->w_status.req = r.get();
  incoming_.push_back(r);
  requests_.emplace(r->id, r);
  stats_.submitted++;
  wake(wake_fd_.get());
  return r->id;
}

Outcome Supervisor::wait(uint64_t id) {
  std::unique_lock<std::mutex> lk(mu_);
  auto it = requests_.find(id);
  if (it == requests_.end()) throw std::invalid_argument("unknown or already collected request id");
  RequestPtr r = it->second;
  done_cv_.wait(lk, [&] { return r->delivered; });
  requests_.erase(id);
  return std::move(r->out);
}

std::vector<std::pair<uint64_t, Outcome>> Supervisor::take_notified() {
  std::lock_guard<std::mutex> lk(mu_);
  drain_eventfd(notify_fd_.get());
  std::vector<std::pair<uint64_t, Outcome>> out;
  for (uint64_t id : notified_) {
    auto it = requests_.find(id);
    if (it == requests_.end()) continue;
    out.emplace_back(id, std::move(it->second->out));
    requests_.erase(it);
  }
  notified_.clear();
  return out;
}

void Supervisor::cancel(uint64_t id) {
  std::lock_guard<std::mutex> lk(mu_);
  cancels_.push_back(id);
  wake(wake_fd_.get());
}

void Supervisor::close() {
  {
    std::lock_guard<std::mutex> lk(mu_);
    if (closed_ && !thread_.joinable()) return;
    closing_ = true;
  }
  wake(wake_fd_.get());
  if (thread_.joinable() && thread_.get_id() != std::this_thread::get_id()) thread_.join();
}

size_t Supervisor::active() const {
  size_t n = 0;
  for (const auto& r : slots_)
    if (r && !r->delivered) ++n;
  return n;
}

SupervisorStats Supervisor::stats() const {
  std::lock_guard<std::mutex> lk(mu_);
  SupervisorStats s = stats_;
  s.queued = queue_.size() + incoming_.size();
  s.inflight = active();
  s.occupied_slots = size_t(std::count_if(slots_.begin(), slots_.end(), [](const RequestPtr& r) { return bool(r); }));
  s.zygote_pid = zygote_pid_;
  s.ready = zstate_ == ZState::Ready;
  s.available = zstate_ != ZState::Refused && failed_starts_ < opt_.unavailable_after;
  return s;
}

std::string Supervisor::ready_json() const {
  std::lock_guard<std::mutex> lk(mu_);
  return ready_json_;
}

std::string Supervisor::zygote_log() const {
  std::lock_guard<std::mutex> lk(mu_);
  return log_tail_;
}

NamespaceSet Supervisor::namespaces() const {
  std::lock_guard<std::mutex> lk(mu_);
  return ns_;
}

bool Supervisor::drop_uid_effective() const {
  std::lock_guard<std::mutex> lk(mu_);
  return drop_uid_;
}

// ---- the I/O thread ------------------------------------------------------------------------

void Supervisor::io_loop() {
  {
    std::lock_guard<std::mutex> lk(mu_);
    spawn_zygote();
  }
  epoll_event events[64];
  for (;;) {
    int64_t deadline;
    {
      std::lock_guard<std::mutex> lk(mu_);
      deadline = next_deadline();
    }
    int timeout_ms = -1;
    if (deadline != INT64_MAX) {
      int64_t left = deadline - monotonic_ns();
      timeout_ms = left <= 0 ? 0 : int(std::min<int64_t>((left + 999999) / 1000000, 60000));
    }
    int n = epoll_wait(epoll_.get(), events, 64, timeout_ms);
    if (n < 0 && errno != EINTR) n = 0;
    std::lock_guard<std::mutex> lk(mu_);
    for (int i = 0; i < std::max(n, 0); ++i) {
      auto* w = static_cast<Watch*>(events[i].data.ptr);
      switch (w->kind) {
        case WatchKind::Wake:
          drain_eventfd(wake_fd_.get());
          break;
        case WatchKind::Ctrl:
          if (ctrl_.valid()) handle_ctrl();
          break;
        case WatchKind::Log:
          handle_log();
          break;
        case WatchKind::Out:
        case WatchKind::Err:
        case WatchKind::Status:
          handle_stream(w->req, w->kind);
          break;
      }
    }
    if (closing_) {
      shutdown_all("sandbox closed");
      closed_ = true;
      ready_cv_.notify_all();
      done_cv_.notify_all();
      return;
    }
    process_incoming();
    check_deadlines(monotonic_ns());
    dispatch();
  }
}

void Supervisor::spawn_zygote() {
  if (ever_ready_) stats_.restarts++;
  if (!policy_.namespaces && !policy_.accept_weaker_isolation) {
    refuse(
        "cir sandbox: refusing to start: namespaces are switched off (namespaces=False), so snippets would see "
        "the host's files; pass accept_weaker_isolation=True (sandbox.accept_weaker_isolation=true) to run them so");
    return;
  }
  int sv[2];
  if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) != 0) {
    start_failed(errno_message("socketpair"));
    return;
  }
  Fd mine(sv[0]), theirs(sv[1]);
  int lp[2];
  if (pipe2(lp, O_CLOEXEC) != 0) {
    start_failed(errno_message("pipe2"));
    return;
  }
  Fd log_r(lp[0]), log_w(lp[1]);
  int ip[2];
  if (pipe2(ip, O_CLOEXEC) != 0) {
    start_failed(errno_message("pipe2"));
    return;
  }
  Fd stdin_r(ip[0]);
  zygote_stdin_.reset(ip[1]);

  const bool root = geteuid() == 0;
  const bool weaker_ok = policy_.accept_weaker_isolation;
  std::vector<NamespaceSet> candidates;
  if (policy_.namespaces) {
    // {user, pid, net, mount, ipc}, best first; without root a user namespace makes the rest possible.
    std::vector<NamespaceSet> base = {{false, true, true, true, true}};
    if (weaker_ok) {
      base.insert(base.end(), {{false, false, true, true, true},
                               {false, true, false, true, false},
                               {false, false, true, false, false},
                               {false, false, false, true, false}});
    }
    for (auto ns : base) {
      if (policy_.network) ns.net = false;
      ns.user = !root;
      candidates.push_back(ns);
    }
  }
  if (weaker_ok) candidates.push_back(NamespaceSet{});
  const std::string& path = opt_.executable.empty() ? opt_.zygote_argv[0] : opt_.executable;
  SpawnResult sp =
      spawn_process(path, opt_.zygote_argv, opt_.zygote_env, stdin_r.get(), theirs.get(), log_w.get(), candidates);
  if (sp.pid < 0) {
    if (!weaker_ok && !ever_ready_) {
      // The kernel may refuse the namespaces themselves (a container, a distribution that
      // restricts unprivileged user namespaces): that is final, not a passing fault. (Once a
      // zygote ran, a refusal is taken as passing, e.g. a namespace limit reached for now.)
      std::string missing = missing_namespaces(!root, !policy_.network);
      if (!missing.empty()) {
        refuse("cir sandbox: refusing to start: this machine cannot isolate snippets (no " + missing +
               "); pass accept_weaker_isolation=True (sandbox.accept_weaker_isolation=true) to run them with "
               "weaker isolation");
        return;
      }
    }
    start_failed("could not start the sandbox interpreter: " + sp.error);
    return;
  }
  zygote_pid_ = sp.pid;
  ns_ = sp.ns;
  drop_uid_ = policy_.uid_per_slot && root && !ns_.user;
  ctrl_ = std::move(mine);
  log_ = std::move(log_r);
  set_nonblocking(log_.get(), true);
  epoll_add(ctrl_.get(), &w_ctrl_);
  epoll_add(log_.get(), &w_log_);

  // Without a mount namespace the work dirs live in a host directory.
  host_work_root_.clear();
  if (!ns_.mount) {
    std::string tmpl = opt_.host_tmp_dir + "/cir-sandbox-XXXXXX";
    std::vector<char> buf(tmpl.begin(), tmpl.end());
    buf.push_back('\0');
    if (mkdtemp(buf.data()) != nullptr) {
      host_work_root_ = buf.data();
      chmod(host_work_root_.c_str(), 0711);
    }
  }

  std::string hello = "{\"namespaces\":{";
  hello += "\"user\":" + std::string(json_bool(ns_.user)) + ",\"pid\":" + json_bool(ns_.pid) +
           ",\"net\":" + json_bool(ns_.net) + ",\"mount\":" + json_bool(ns_.mount) + ",\"ipc\":" + json_bool(ns_.ipc);
  hello += "},\"host_work_root\":" + json_string(host_work_root_);
  hello += ",\"drop_uid\":" + std::string(json_bool(drop_uid_));
  hello += ",\"uid_base\":" + std::to_string(opt_.uid_base);
  hello += ",\"uid_slots\":" + std::to_string(slots_.size());
  hello += ",\"policy\":" + opt_.policy_json;
  hello += ",\"config\":" + opt_.zygote_config_json + "}";
  proto::Header h{proto::Type::Hello, uint32_t(hello.size())};
  std::string msg(reinterpret_cast<const char*>(&h), sizeof h);
  msg += hello;
  send_packet(ctrl_.get(), msg.data(), msg.size(), nullptr, 0);
  zstate_ = ZState::Starting;
  startup_deadline_ns_ = monotonic_ns() + seconds_ns(opt_.startup_timeout_s);
}

void Supervisor::refuse(const std::string& why) {
  refusal_ = why;
  if (zygote_pid_ > 0) {
    kill(zygote_pid_, SIGKILL);
    int st;
    while (waitpid(zygote_pid_, &st, 0) < 0 && errno == EINTR) {
    }
    zygote_pid_ = -1;
  }
  epoll_del(ctrl_.get());
  epoll_del(log_.get());
  ctrl_.reset();
  log_.reset();
  zstate_ = ZState::Refused;
  fail_queued(why);
  ready_cv_.notify_all();
}

// A zygote start that did not get as far as ready: try again after a backoff that doubles
// with each failure in a row, for ever. Past `unavailable_after` failures, nothing waits for it.
void Supervisor::start_failed(const std::string& why) {
  failed_starts_++;
  stats_.start_failures++;
  last_start_error_ = why;
  zstate_ = ZState::Waiting;
  double backoff = opt_.restart_backoff_s;
  for (int i = 1; i < failed_starts_ && backoff < opt_.restart_backoff_max_s; ++i) backoff *= 2;
  restart_at_ns_ = monotonic_ns() + seconds_ns(std::min(backoff, opt_.restart_backoff_max_s));
  if (failed_starts_ >= opt_.unavailable_after) {
    size_t n = queue_.size() + incoming_.size();
    stats_.unavailable += n;
    fail_queued(unavailable_message());
    ready_cv_.notify_all();
  }
}

// Processes snippets left behind when there is no pid namespace to take them down with the
// zygote: everything of the slot uids, or the snippets' process groups.
void Supervisor::kill_slot_processes() {
  if (ns_.pid) return;
  for (size_t s = 0; s < slots_.size(); ++s) {
    Request* r = slots_[s].get();
    if (r == nullptr) continue;
    if (drop_uid_) {
      kill_all_of_uid(opt_.uid_base + uint32_t(s), opt_.uid_base + uint32_t(s));
    } else if (r->pid > 0) {
      kill(-r->pid, SIGKILL);
    }
  }
}

void Supervisor::zygote_died(const std::string& why) {
  bool was_ready = zstate_ == ZState::Ready;
  if (zygote_pid_ > 0) {
    kill(zygote_pid_, SIGKILL);
    int st;
    while (waitpid(zygote_pid_, &st, 0) < 0 && errno == EINTR) {
    }
  }
  handle_log();
  epoll_del(ctrl_.get());
  epoll_del(log_.get());
  ctrl_.reset();
  log_.reset();
  kill_slot_processes();
  zygote_pid_ = -1;
  // In-flight snippets: those already answered, or killed for their own limits, are finished;
  // the others were the machine's fault: retried on the next zygote (or given up).
  std::vector<RequestPtr> snapshot(slots_.rbegin(), slots_.rend());
  for (RequestPtr& r : snapshot) {
    if (!r) continue;
    r->gone = true;
    if (r->delivered) {
      release_slot(r.get());
      continue;
    }
    if (r->kill_requested && r->pending_fault.empty()) {
      if (!r->out.has_status) {
        r->out.has_status = true;
        r->out.wait_status = SIGKILL;  // as from a process killed by SIGKILL
        r->out.exit_code = -SIGKILL;
        if (r->t_cell_ns) r->out.wall_ms = double(monotonic_ns() - r->t_cell_ns) / 1e6;
      }
      deliver(r.get());
      release_slot(r.get());
      continue;
    }
    retry_or_fault(r, r->pending_fault.empty() ? "interpreter_lost" : r->pending_fault);
  }
  if (!host_work_root_.empty()) remove_tree(host_work_root_);
  host_work_root_.clear();
  if (zstate_ == ZState::Refused || closing_) return;
  if (was_ready) {
    failed_starts_ = 0;
    spawn_zygote();  // it was running: start the next one at once
  } else {
    start_failed(why + (log_tail_.empty() ? "" : "; zygote stderr: " + last_line(log_tail_)));
  }
}

void Supervisor::handle_log() {
  if (!log_.valid()) return;
  char buf[8192];
  for (;;) {
    ssize_t n = ::read(log_.get(), buf, sizeof buf);
    if (n == 0) {
      epoll_del(log_.get());
      log_.reset();
      return;
    }
    if (n < 0) break;
    log_tail_.append(buf, size_t(n));
    if (log_tail_.size() > kLogTail) log_tail_.erase(0, log_tail_.size() - kLogTail);
  }
}

Supervisor::RequestPtr Supervisor::in_slot(uint64_t id) {
  for (auto& r : slots_)
    if (r && r->id == id) return r;
  return nullptr;
}

void Supervisor::handle_ctrl() {
  alignas(8) char buf[1 << 16];
  for (;;) {
    ssize_t n;
    {
      iovec iov{buf, sizeof buf};
      msghdr msg{};
      msg.msg_iov = &iov;
      msg.msg_iovlen = 1;
      do {
        n = ::recvmsg(ctrl_.get(), &msg, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
      } while (n < 0 && errno == EINTR);
    }
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return;
    if (n <= 0) {
      zygote_died(n == 0 ? "it exited" : errno_message("read"));
      return;
    }
    proto::Type type;
    std::memcpy(&type, buf, sizeof type);
    if (type == proto::Type::Ready && size_t(n) >= sizeof(proto::Header) + sizeof(uint32_t)) {
      proto::Header h;
      uint32_t flags;
      std::memcpy(&h, buf, sizeof h);
      std::memcpy(&flags, buf + sizeof h, sizeof flags);
      size_t at = sizeof h + sizeof flags;
      ready_json_.assign(buf + at, std::min<size_t>(h.length, size_t(n) - at));
      if (!(flags & proto::kUsesHostWorkRoot) && !host_work_root_.empty()) {
        // The zygote has a private /tmp: nothing to leave behind on the host if we are killed.
        remove_tree(host_work_root_);
        host_work_root_.clear();
      }
      zstate_ = ZState::Ready;
      ever_ready_ = true;
      failed_starts_ = 0;
      ready_cv_.notify_all();
    } else if (type == proto::Type::Refused && size_t(n) >= sizeof(proto::Header)) {
      proto::Header h;
      std::memcpy(&h, buf, sizeof h);
      std::string why(buf + sizeof h, std::min<size_t>(h.length, size_t(n) - sizeof h));
      if (!ever_ready_) {
        refuse(why);  // the machine cannot do what the policy asks: final
        return;
      }
      last_start_error_ = why;  // it could before: a passing failure, the restart logic decides
    } else if (type == proto::Type::Started && size_t(n) >= sizeof(proto::StartedReport)) {
      proto::StartedReport s;
      std::memcpy(&s, buf, sizeof s);
      RequestPtr held = in_slot(s.req_id);  // keeps *r alive while its slot is released
      Request* r = held.get();
      if (r == nullptr || r->state != RState::Sent) continue;
      r->state = RState::Running;
      r->pid = s.pid;
      r->t_start_ns = s.t_start_ns;
      r->t_cell_ns = s.t_start_ns;
      r->delay_base_ns = std::max<int64_t>(0, s.run_delay_ns);
      r->in_replay = !r->job.cells.empty();
      double limit = r->in_replay ? r->job.replay_timeout_s : r->job.timeout_s;
      r->deadline_ns = s.t_start_ns + seconds_ns(limit);
      r->guard_ns = s.t_start_ns + seconds_ns(limit * opt_.wall_guard_factor + opt_.wall_guard_extra_s);
      if (r->kill_requested) request_kill(r);
      // Records written before this report was read (a very short snippet) are applied now.
      handle_status_records(r);
    } else if (type == proto::Type::Exited && size_t(n) >= sizeof(proto::ExitedReport)) {
      proto::ExitedReport e;
      std::memcpy(&e, buf, sizeof e);
      RequestPtr held = in_slot(e.req_id);  // keeps *r alive while its slot is released
      Request* r = held.get();
      if (r == nullptr) continue;
      r->gone = true;
      if (r->delivered) {
        release_slot(r);
        continue;
      }
      if (!r->out.has_status) {
        r->out.has_status = true;
        r->out.wait_status = e.wait_status;
        r->out.exit_code = WIFEXITED(e.wait_status) ? WEXITSTATUS(e.wait_status) : -WTERMSIG(e.wait_status);
        r->out.wall_ms = double(e.t_end_ns - r->t_cell_ns) / 1e6;
        double cpu = double(e.utime_us + e.stime_us) / 1e3 - double(r->replay_cpu_ns) / 1e6;
        r->out.cpu_ms = std::max(cpu, 0.0);
        r->out.maxrss_kb = e.maxrss_kb;
      }
      if (r->out.exit_code == proto::kSetupFailedExit && r->pending_fault.empty() && setup_failed(r))
        r->pending_fault = "start_failed";  // the process could not be set up: retried
      r->grace_ns = monotonic_ns() + kExitGraceNs;
      maybe_deliver_after_exit(r);
    } else if (type == proto::Type::Failed && size_t(n) >= sizeof(proto::FailedReport)) {
      proto::FailedReport f;
      std::memcpy(&f, buf, sizeof f);
      RequestPtr held = in_slot(f.req_id);  // keeps *r alive while its slot is released
      Request* r = held.get();
      if (r == nullptr) continue;
      r->gone = true;
      retry_or_fault(held, "start_failed");
    }
  }
}

void Supervisor::handle_stream(Request* r, WatchKind kind) {
  if (r == nullptr || r->delivered) return;
  Fd& fd = kind == WatchKind::Out ? r->out_r : kind == WatchKind::Err ? r->err_r : r->status_r;
  if (!fd.valid()) return;
  char buf[65536];
  for (;;) {
    ssize_t n = ::read(fd.get(), buf, sizeof buf);
    if (n < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) break;
      n = 0;  // treat errors as end of stream
    }
    if (n == 0) {
      epoll_del(fd.get());
      fd.reset();
      break;
    }
    if (kind == WatchKind::Status) {
      r->status_buf.append(buf, size_t(n));
      continue;
    }
    if (r->out.truncated) continue;  // past the limit: drain and drop
    size_t used = r->out.out.size() + r->out.err.size();
    size_t room = opt_.max_output_bytes > used ? opt_.max_output_bytes - used : 0;
    std::string& dst = kind == WatchKind::Out ? r->out.out : r->out.err;
    if (size_t(n) <= room) {
      dst.append(buf, size_t(n));
    } else {
      dst.append(buf, room);
      r->out.truncated = true;
      r->out.truncated_stream = kind == WatchKind::Out ? 1 : 2;
      stats_.output_limits++;
      request_kill(r);
    }
  }
  if (kind == WatchKind::Status) handle_status_records(r);
  if (!r->delivered) maybe_deliver_after_exit(r);
}

void Supervisor::handle_status_records(Request* r) {
  if (r->state != RState::Running) return;  // applied once the start report is in
  while (!r->delivered && r->status_buf.size() >= sizeof(proto::StatusRecord)) {
    proto::StatusRecord rec;
    std::memcpy(&rec, r->status_buf.data(), sizeof rec);
    r->status_buf.erase(0, sizeof rec);
    if (rec.kind == proto::StatusKind::ReplayDone && r->in_replay) {
      r->in_replay = false;
      r->replay_cpu_ns = rec.cpu_ns;
      r->t_cell_ns = rec.t_ns;
      if (rec.run_delay_ns >= 0) r->delay_base_ns = rec.run_delay_ns;
      r->deadline_ns = r->t_cell_ns + seconds_ns(r->job.timeout_s);
      r->guard_ns = r->t_cell_ns + seconds_ns(r->job.timeout_s * opt_.wall_guard_factor + opt_.wall_guard_extra_s);
    } else if (rec.kind == proto::StatusKind::Done && !r->in_replay && !r->out.timed_out && !r->kill_requested &&
               r->pending_fault.empty()) {
      // The code has run and flushed its output: answer now, without waiting for the
      // process to be torn down. Everything it wrote before is already in the pipes.
      for (WatchKind k : {WatchKind::Out, WatchKind::Err}) {
        Fd& f = k == WatchKind::Out ? r->out_r : r->err_r;
        if (f.valid()) handle_stream(r, k);
        if (r->delivered) return;
      }
      if (r->out.truncated) return;  // killed for its output: finished through the exit path
      r->out.has_status = true;
      r->out.exit_code = rec.status;
      r->out.wait_status = rec.status >= 0 ? (rec.status & 0xff) << 8 : (-rec.status & 0x7f);
      r->out.wall_ms = double(rec.t_ns - r->t_cell_ns) / 1e6;
      r->out.cpu_ms = std::max(0.0, double(rec.cpu_ns - r->replay_cpu_ns) / 1e6);
      r->out.maxrss_kb = rec.maxrss_kb;
      deliver(r);
      return;
    }
  }
}

void Supervisor::process_incoming() {
  while (!incoming_.empty()) {
    queue_.push_back(std::move(incoming_.front()));
    incoming_.pop_front();
  }
  for (uint64_t id : cancels_) {
    auto it = requests_.find(id);
    if (it == requests_.end()) continue;
    RequestPtr r = it->second;
    if (r->delivered) continue;
    r->out.cancelled = true;
    if (r->state == RState::Queued) {
      queue_.erase(std::remove(queue_.begin(), queue_.end(), r), queue_.end());
      deliver(r.get());
    } else {
      request_kill(r.get());
    }
  }
  cancels_.clear();
}

void Supervisor::dispatch() {
  if (zstate_ != ZState::Ready) return;
  const int64_t now = monotonic_ns();
  while (active() < size_t(opt_.workers)) {
    auto free_slot = std::find(slots_.begin(), slots_.end(), nullptr);
    if (free_slot == slots_.end()) return;
    // The first request that is due (a retry waits out its backoff in the queue).
    auto due = std::find_if(queue_.begin(), queue_.end(), [&](const RequestPtr& q) { return q->not_before_ns <= now; });
    if (due == queue_.end()) return;
    RequestPtr r = *due;
    queue_.erase(due);
    const Job& j = r->job;
    // Kept until the outcome: a process that cannot be set up marks it (proto::kSetupFailedMark).
    Fd& code = r->code;
    code.reset(make_memfd("cir-snippet", pack_program(j.cells, j.code)));
    int po[2] = {-1, -1}, pe[2] = {-1, -1}, ps[2] = {-1, -1};
    if (!code.valid() || pipe2(po, O_CLOEXEC) != 0 || pipe2(pe, O_CLOEXEC) != 0 || pipe2(ps, O_CLOEXEC) != 0) {
      for (int fd : {po[0], po[1], pe[0], pe[1], ps[0], ps[1]})
        if (fd >= 0) ::close(fd);
      // Out of descriptors or memory here, in the training process: not the snippet's doing.
      r->out.attempts++;
      retry_or_fault(r, "host_resource");
      continue;
    }
    Fd out_w(po[1]), err_w(pe[1]), status_w(ps[1]);
    r->out_r.reset(po[0]);
    r->err_r.reset(pe[0]);
    r->status_r.reset(ps[0]);
    proto::RunRequest m{};
    m.type = proto::Type::Run;
    m.slot = uint32_t(free_slot - slots_.begin());
    m.req_id = r->id;
    m.as_bytes = j.as_bytes;
    m.cpu_seconds = j.cpu_seconds;
    m.fsize_bytes = j.fsize_bytes;
    m.nproc = j.nproc;
    m.nofile = j.nofile;
    int fds[4] = {code.get(), out_w.get(), err_w.get(), status_w.get()};
    if (!send_packet(ctrl_.get(), &m, sizeof m, fds, 4)) {
      // The zygote is gone; its hang-up event will requeue everything.
      close_streams(r.get());
      queue_.push_front(r);
      return;
    }
    for (Fd* f : {&r->out_r, &r->err_r, &r->status_r}) set_nonblocking(f->get(), true);
    epoll_add(r->out_r.get(), &r->w_out);
    epoll_add(r->err_r.get(), &r->w_err);
    epoll_add(r->status_r.get(), &r->w_status);
    r->state = RState::Sent;
    r->slot = int(m.slot);
    r->out.attempts++;
    *free_slot = r;
  }
}

void Supervisor::request_kill(Request* r) {
  r->kill_requested = true;
  if (r->state != RState::Running || r->kill_sent || r->gone || !ctrl_.valid()) return;
  proto::KillRequest k{proto::Type::Kill, uint32_t(r->slot), r->id};
  send_packet(ctrl_.get(), &k, sizeof k, nullptr, 0);
  r->kill_sent = true;
  r->kill_ns = monotonic_ns();
}

int64_t Supervisor::next_deadline() const {
  int64_t d = INT64_MAX;
  if (zstate_ == ZState::Starting) d = std::min(d, startup_deadline_ns_);
  if (zstate_ == ZState::Waiting) d = std::min(d, restart_at_ns_);
  if (zstate_ == ZState::Ready)
    for (const auto& q : queue_)
      if (q->not_before_ns > 0) d = std::min(d, q->not_before_ns);
  const int64_t grace = seconds_ns(opt_.kill_grace_s);
  for (const auto& r : slots_) {
    if (!r) continue;
    if (r->state != RState::Running) continue;
    if (r->gone) {
      if (!r->delivered) d = std::min(d, r->grace_ns);
    } else if (r->kill_sent) {
      d = std::min(d, r->kill_ns + grace);
    } else if (r->delivered) {
      d = std::min(d, r->linger_ns);
    } else {
      d = std::min(d, r->deadline_ns);
    }
  }
  return d;
}

// The snippet's main process as this supervisor sees it (its pid in the zygote's pid
// namespace is another number): the zygote's child whose innermost pid is the one reported.
pid_t Supervisor::host_pid_of(Request* r) {
  if (r->host_pid != 0) return r->host_pid;
  r->host_pid = -1;
  if (!ns_.pid) {
    r->host_pid = r->pid;
  } else if (zygote_pid_ > 0) {
    for (long v : zygote_children()) {
      std::string status;
      if (!read_file(("/proc/" + std::to_string(v) + "/status").c_str(), &status)) continue;
      size_t at = status.find("\nNSpid:");
      if (at == std::string::npos) continue;
      size_t eol = status.find('\n', at + 1);
      std::string line = status.substr(at + 8, eol == std::string::npos ? std::string::npos : eol - at - 8);
      size_t last = line.find_last_of(" \t");
      if (std::strtol(line.c_str() + (last == std::string::npos ? 0 : last + 1), nullptr, 10) == r->pid) {
        r->host_pid = pid_t(v);
        break;
      }
    }
  }
  return r->host_pid;
}

std::vector<long> Supervisor::zygote_children() const {
  std::vector<long> out;
  std::string kids;
  std::string path = "/proc/" + std::to_string(zygote_pid_) + "/task/" + std::to_string(zygote_pid_) + "/children";
  if (zygote_pid_ <= 0 || !read_file(path.c_str(), &kids)) return out;
  const char* p = kids.c_str();
  char* end;
  for (long v = std::strtol(p, &end, 10); end != p; v = std::strtol(p, &end, 10)) {
    out.push_back(v);
    p = end;
  }
  return out;
}

// Time waited in the CPU queue (runnable, not running) by the snippet's main process since it
// was created, from the scheduler's per-task statistics; -1 where they cannot be read.
int64_t Supervisor::run_delay_ns(Request* r) {
  pid_t pid = host_pid_of(r);
  return pid > 0 ? run_delay_of(std::to_string(pid)) : -1;
}

// The snippet's own time: the wall clock since its cell started, less the time its main
// process was ready to run but waited for a CPU since then.
int64_t Supervisor::own_time_ns(Request* r, int64_t now) {
  int64_t wall = now - r->t_cell_ns;
  int64_t waited = run_delay_ns(r);
  if (waited < 0) return wall;
  return std::max<int64_t>(0, wall - std::max<int64_t>(0, waited - r->delay_base_ns));
}

// CPU time used so far by the snippet's processes together: the main one, the children it
// has waited for, the descendants still running, and the processes orphaned to the zygote
// (detached with setsid and a double fork: whose they are cannot be told, so they count
// for every running snippet; a snippet must not be able to look starved by its own doing).
int64_t Supervisor::tree_cpu_ns(Request* r) {
  if (host_pid_of(r) <= 0) return -1;
  static const long ticks = sysconf(_SC_CLK_TCK);
  int64_t total_ticks = 0;
  std::vector<long> todo = {long(r->host_pid)};
  std::set<long> others;  // the main processes of the other running snippets
  for (const auto& q : slots_)
    if (q && q.get() != r && q->state == RState::Running && !q->gone && host_pid_of(q.get()) > 0)
      others.insert(q->host_pid);
  for (long kid : zygote_children())
    if (kid != r->host_pid && !others.count(kid)) todo.push_back(kid);
  for (size_t i = 0; i < todo.size() && i < 4096; ++i) {
    std::string base = "/proc/" + std::to_string(todo[i]);
    std::string stat;
    if (!read_file((base + "/stat").c_str(), &stat)) continue;
    size_t close = stat.rfind(')');  // the command name may hold spaces
    if (close == std::string::npos) continue;
    unsigned long long ut = 0, st = 0;
    long long cut = 0, cst = 0;
    if (std::sscanf(stat.c_str() + close + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %llu %llu %lld %lld", &ut,
                    &st, &cut, &cst) != 4)
      continue;
    total_ticks += int64_t(ut + st) + (i == 0 ? cut + cst : 0);
    DIR* tasks = opendir((base + "/task").c_str());
    if (tasks == nullptr) continue;
    while (dirent* e = readdir(tasks)) {
      if (e->d_name[0] < '0' || e->d_name[0] > '9') continue;
      std::string kids;
      if (!read_file((base + "/task/" + e->d_name + "/children").c_str(), &kids)) continue;
      const char* p = kids.c_str();
      char* end;
      for (long v = std::strtol(p, &end, 10); end != p; v = std::strtol(p, &end, 10)) {
        todo.push_back(v);
        p = end;
      }
    }
    closedir(tasks);
  }
  return ticks > 0 ? total_ticks * (1000000000LL / ticks) : -1;
}

void Supervisor::check_deadlines(int64_t now) {
  if (zstate_ == ZState::Starting && now >= startup_deadline_ns_) {
    zygote_died("no ready report within the start-up timeout");
    return;
  }
  if (zstate_ == ZState::Waiting && now >= restart_at_ns_ && !closing_) {
    spawn_zygote();
    return;
  }
  const int64_t grace = seconds_ns(opt_.kill_grace_s);
  std::vector<RequestPtr> snapshot(slots_.begin(), slots_.end());
  for (auto& r : snapshot) {
    if (!r || r->state != RState::Running || r->gone || r->kill_sent) continue;
    if (!r->delivered && now >= r->deadline_ns) {
      const int64_t limit = seconds_ns(r->in_replay ? r->job.replay_timeout_s : r->job.timeout_s);
      const int64_t own = own_time_ns(r.get(), now);
      // Its own time is up; or its processes together have had their limit's worth of CPU
      // (then what its main process waited behind was itself, e.g. the children it forked).
      if (own >= limit || tree_cpu_ns(r.get()) >= limit) {
        r->out.timed_out = true;
        stats_.timeouts++;
        request_kill(r.get());
      } else if (now >= r->guard_ns) {
        r->pending_fault = "starved";  // the wall-clock guard, with its own time not used up
        request_kill(r.get());
      } else {
        r->deadline_ns = std::min(r->guard_ns, now + std::max(limit - own, kMinRecheckNs));
      }
    } else if (r->delivered && now >= r->linger_ns) {
      request_kill(r.get());  // answered, but the process does not go away
    }
  }
  for (auto& r : snapshot) {
    if (!r || r->state != RState::Running || r->gone) continue;
    if (r->kill_sent && now >= r->kill_ns + grace) {
      // The zygote did not report the killed snippet gone: it is wedged. Start over.
      zygote_died("a killed snippet was not reported gone");
      return;
    }
  }
  for (auto& r : snapshot) {
    if (r && r->gone && !r->delivered && now >= r->grace_ns) {
      close_streams(r.get());  // descendants we could not see still hold the pipes
      maybe_deliver_after_exit(r.get());
    }
  }
}

void Supervisor::maybe_deliver_after_exit(Request* r) {
  if (r->gone && !r->delivered && !r->out_r.valid() && !r->err_r.valid() && !r->status_r.valid()) {
    if (!r->pending_fault.empty()) {
      RequestPtr held = in_slot(r->id);
      if (held) {
        retry_or_fault(held, r->pending_fault);
        return;
      }
    }
    deliver(r);
    release_slot(r);
  }
}

// A fault of the machine ended this attempt (the process, if any, is gone): run the snippet
// again after a backoff, or, attempts used up, deliver the fault.
void Supervisor::retry_or_fault(const RequestPtr& r, const std::string& reason) {
  close_streams(r.get());
  release_slot(r.get());
  if (closing_ || r->out.cancelled) {
    if (closing_ && !r->out.cancelled) {
      r->out.infra_error = true;
      r->out.infra_message = "sandbox closed";
    }
    deliver(r.get());
    return;
  }
  if (r->out.attempts >= opt_.fault_attempts) {
    Outcome fault;
    fault.fault = reason;
    fault.attempts = r->out.attempts;
    if (reason == "interpreter_lost") stats_.faults_interpreter_lost++;
    if (reason == "start_failed") stats_.faults_start_failed++;
    if (reason == "host_resource") stats_.faults_host_resource++;
    if (reason == "starved") stats_.faults_starved++;
    r->out = std::move(fault);
    deliver(r.get());
    return;
  }
  Outcome fresh;
  fresh.attempts = r->out.attempts;
  r->out = std::move(fresh);
  r->code.reset();
  r->state = RState::Queued;
  r->gone = false;
  r->pid = -1;
  r->host_pid = 0;
  r->kill_sent = r->kill_requested = false;
  r->t_start_ns = r->t_cell_ns = r->deadline_ns = r->guard_ns = r->grace_ns = r->kill_ns = r->linger_ns = 0;
  r->replay_cpu_ns = r->delay_base_ns = 0;
  r->in_replay = false;
  r->pending_fault.clear();
  r->status_buf.clear();
  double backoff = opt_.retry_backoff_s;
  for (int i = 1; i < r->out.attempts; ++i) backoff *= 2;
  r->not_before_ns = monotonic_ns() + seconds_ns(backoff);
  queue_.push_front(r);
  stats_.retries++;
}

void Supervisor::close_streams(Request* r) {
  for (Fd* f : {&r->out_r, &r->err_r, &r->status_r}) {
    if (!f->valid()) continue;
    epoll_del(f->get());
    f->reset();
  }
}

bool Supervisor::setup_failed(Request* r) {
  char mark[sizeof proto::kSetupFailedMark];
  return r->code.valid() && pread(r->code.get(), mark, sizeof mark, 0) == ssize_t(sizeof mark) &&
         std::memcmp(mark, proto::kSetupFailedMark, sizeof mark) == 0;
}

void Supervisor::release_slot(Request* r) {
  close_streams(r);
  const int slot = r->slot;
  r->slot = -1;
  // The slot may hold the last reference (the caller has already collected the outcome): then
  // this destroys *r, so nothing of it may be touched afterwards, here or in the caller.
  if (slot >= 0 && size_t(slot) < slots_.size() && slots_[size_t(slot)].get() == r) slots_[size_t(slot)].reset();
}

void Supervisor::deliver(Request* r) {
  if (r->delivered) return;
  close_streams(r);
  r->code.reset();
  r->delivered = true;
  r->linger_ns = monotonic_ns() + int64_t(opt_.kill_grace_s * 1e9);
  if (r->gone || r->state == RState::Queued) release_slot(r);
  if (!r->out.infra_error && !r->out.cancelled && r->out.fault.empty()) stats_.executed++;
  if (r->job.notify) {
    notified_.push_back(r->id);
    wake(notify_fd_.get());
  }
  done_cv_.notify_all();
}

void Supervisor::fail_queued(const std::string& why) {
  std::deque<RequestPtr> q;
  q.swap(queue_);
  for (auto& r : incoming_) q.push_back(r);
  incoming_.clear();
  for (auto& r : q) {
    r->out.infra_error = true;
    r->out.infra_message = why;
    deliver(r.get());
  }
}

void Supervisor::shutdown_all(const std::string& why) {
  if (zygote_pid_ > 0) {
    kill(zygote_pid_, SIGKILL);
    int st;
    while (waitpid(zygote_pid_, &st, 0) < 0 && errno == EINTR) {
    }
    zygote_pid_ = -1;
  }
  kill_slot_processes();
  epoll_del(ctrl_.get());
  epoll_del(log_.get());
  ctrl_.reset();
  log_.reset();
  zstate_ = ZState::Waiting;
  std::vector<RequestPtr> snapshot(slots_.begin(), slots_.end());
  for (auto& r : snapshot) {
    if (!r) continue;
    r->gone = true;
    if (!r->delivered) {
      r->out.infra_error = true;
      r->out.infra_message = why;
      deliver(r.get());
    }
    release_slot(r.get());
  }
  fail_queued(why);
  if (!host_work_root_.empty()) remove_tree(host_work_root_);
  host_work_root_.clear();
}

}  // namespace cir::sandbox
