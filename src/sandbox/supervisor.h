// The supervisor: lives in the training process, owns a request queue, a fixed number of
// worker slots and the warm zygote, and runs one I/O thread (epoll) that feeds requests to
// the zygote, reads each snippet's output, enforces wall-clock and output limits, and
// restarts the zygote if it dies. Callers block in wait() (or watch notify_fd()); the
// I/O thread never calls back into them.
#pragma once

#include <sys/types.h>

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_map>
#include <utility>
#include <vector>

#include "sandbox/isolation.h"
#include "sandbox/util.h"

namespace cir::sandbox {

struct SupervisorOptions {
  std::string executable;                // path to execve; empty: zygote_argv[0]
  std::vector<std::string> zygote_argv;  // argv[0]: the Python executable as the zygote should see it
  std::vector<std::string> zygote_env;   // the zygote's whole environment
  std::string zygote_config_json = "{}";  // passed through to the zygote as "config"
  int workers = 2;
  size_t max_output_bytes = 64 * 1024;   // stdout + stderr together
  bool use_namespaces = true;            // pid/net/mount/ipc namespaces where allowed
  bool allow_user_namespace = true;      // when not root: try a user namespace to get them
  bool net_namespace = true;             // false: snippets keep the host's network
  bool drop_uid = true;                  // as root: one unprivileged uid per slot
  uint32_t uid_base = 0;                 // 0: a random block of the high uid range
  std::string host_tmp_dir = "/tmp";     // where the per-sandbox work root is made
  double startup_timeout_s = 300;
  double kill_grace_s = 5;               // a killed snippet must be reported gone by then
};

struct Job {
  std::string code;
  std::vector<std::string> cells;  // session mode: earlier cells replayed first, silently
  double timeout_s = 5;            // wall clock for `code`, from its start
  double replay_timeout_s = 0;     // wall clock for replaying `cells`
  uint64_t as_bytes = 0;
  uint64_t cpu_seconds = 0;
  uint64_t fsize_bytes = 0;
  uint32_t nproc = 0;
  uint32_t nofile = 0;
  bool notify = false;  // completion is announced on notify_fd() and collected with take_notified()
};

struct Outcome {
  bool infra_error = false;  // the sandbox itself failed (closed, zygote cannot start, ...)
  std::string infra_message;
  std::string out, err;
  bool truncated = false;  // output passed max_output_bytes; the snippet was killed
  int truncated_stream = 0;  // 1: stdout was cut, 2: stderr was cut
  bool timed_out = false;  // the snippet ran past its wall-clock limit; it was killed
  bool cancelled = false;
  bool lost = false;       // the zygote died under it twice
  bool has_status = false;
  int wait_status = 0;
  int exit_code = 0;       // like subprocess: exit status, or -signal
  double wall_ms = 0;
  double cpu_ms = 0;
  int64_t maxrss_kb = 0;
  int attempts = 0;
};

struct SupervisorStats {
  uint64_t submitted = 0, executed = 0, timeouts = 0, output_limits = 0, retries = 0, lost = 0;
  uint64_t restarts = 0;  // zygote restarts after it was ready once
  size_t queued = 0, inflight = 0;
  size_t occupied_slots = 0;  // inflight + answered snippets whose process is still being torn down
  pid_t zygote_pid = -1;
  bool ready = false;
};

class Supervisor {
 public:
  explicit Supervisor(SupervisorOptions options);
  ~Supervisor();
  Supervisor(const Supervisor&) = delete;
  Supervisor& operator=(const Supervisor&) = delete;

  // Waits for the first zygote to be ready (imports and warm-up done).
  bool wait_ready(double timeout_s, std::string* error);
  uint64_t submit(Job job);  // throws std::runtime_error once closed or failed
  Outcome wait(uint64_t id);  // blocks until done; the id is released
  std::vector<std::pair<uint64_t, Outcome>> take_notified();
  int notify_fd() const { return notify_fd_.get(); }
  void cancel(uint64_t id);
  void close();

  SupervisorStats stats() const;
  std::string ready_json() const;  // what the zygote reported (isolation facts, ...)
  std::string zygote_log() const;  // tail of the zygote's own stderr
  NamespaceSet namespaces() const;
  uint32_t uid_base() const { return opt_.uid_base; }
  int uid_slots() const { return int(slots_.size()); }
  bool drop_uid_effective() const;

 private:
  enum class ZState { Starting, Ready, Dead, Failed };
  enum class RState { Queued, Sent, Running };
  enum class WatchKind { Ctrl, Log, Wake, Out, Err, Status };
  struct Request;
  struct Watch {
    WatchKind kind;
    Request* req;
  };
  // A request lives in `requests_` until its caller collects the outcome, and in a slot
  // until its process is gone; whichever comes last frees it.
  struct Request {
    uint64_t id = 0;
    Job job;
    Outcome out;
    RState state = RState::Queued;
    bool delivered = false;  // the outcome is final and announced to the caller
    bool gone = false;       // the zygote reported the process (and everything it started) gone
    int slot = -1;
    pid_t pid = -1;
    Fd out_r, err_r, status_r;
    Watch w_out{WatchKind::Out, nullptr}, w_err{WatchKind::Err, nullptr}, w_status{WatchKind::Status, nullptr};
    int64_t t_start_ns = 0, t_cell_ns = 0, deadline_ns = 0, grace_ns = 0, kill_ns = 0, linger_ns = 0;
    int64_t replay_cpu_ns = 0;
    bool in_replay = false;
    bool kill_requested = false, kill_sent = false;
    std::string status_buf;
  };
  using RequestPtr = std::shared_ptr<Request>;

  void io_loop();
  void spawn_zygote();
  void zygote_died(const std::string& why);
  void handle_ctrl();
  void handle_log();
  void handle_stream(Request* r, WatchKind kind);
  void handle_status_records(Request* r);
  void process_incoming();
  void dispatch();
  void check_deadlines(int64_t now);
  int64_t next_deadline() const;
  void request_kill(Request* r);
  void maybe_deliver_after_exit(Request* r);
  void deliver(Request* r);
  void release_slot(Request* r);
  void close_streams(Request* r);
  RequestPtr in_slot(uint64_t id);
  void shutdown_all(const std::string& why);
  void fail_queued(const std::string& why);
  void epoll_add(int fd, Watch* w);
  void epoll_del(int fd);
  void kill_slot_processes();
  size_t active() const;

  SupervisorOptions opt_;
  mutable std::mutex mu_;
  std::condition_variable done_cv_, ready_cv_;
  std::unordered_map<uint64_t, RequestPtr> requests_;
  std::deque<RequestPtr> incoming_, queue_;
  std::vector<uint64_t> cancels_;
  std::vector<uint64_t> notified_;
  // Twice as many uid slots as workers: a finished snippet's process can be torn down in its
  // slot while the next snippet already runs in another.
  std::vector<RequestPtr> slots_;
  uint64_t next_id_ = 1;
  bool closing_ = false, closed_ = false;
  std::string failure_;

  Fd epoll_, wake_fd_, notify_fd_;
  Fd ctrl_, log_;
  Fd zygote_stdin_;  // write end of the zygote's stdin: held open, never written
  pid_t zygote_pid_ = -1;
  NamespaceSet ns_;
  bool drop_uid_ = false;
  ZState zstate_ = ZState::Dead;
  bool ever_ready_ = false;
  int start_failures_ = 0;
  int64_t startup_deadline_ns_ = 0;
  std::string ready_json_, log_tail_, host_work_root_;
  Watch w_ctrl_{WatchKind::Ctrl, nullptr}, w_log_{WatchKind::Log, nullptr}, w_wake_{WatchKind::Wake, nullptr};
  SupervisorStats stats_;
  std::thread thread_;
};

}  // namespace cir::sandbox
