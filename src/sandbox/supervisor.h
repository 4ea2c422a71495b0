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
#include "sandbox/policy.h"
#include "sandbox/util.h"

namespace cir::sandbox {

struct SupervisorOptions {
  std::string executable;                // path to execve; empty: zygote_argv[0]
  std::vector<std::string> zygote_argv;  // argv[0]: the Python executable as the zygote should see it
  std::vector<std::string> zygote_env;   // the zygote's whole environment
  std::string zygote_config_json = "{}";  // passed through to the zygote as "config"
  std::string policy_json;               // the isolation policy (IsolationPolicy::from_json), also passed on
  int workers = 2;
  size_t max_output_bytes = 64 * 1024;   // stdout + stderr together
  uint32_t uid_base = 0;                 // 0: a random block of the high uid range
  std::string host_tmp_dir = "/tmp";     // where the per-sandbox work root is made (weaker isolation only)
  double startup_timeout_s = 300;
  double kill_grace_s = 5;               // a killed snippet must be reported gone by then
  // Faults of the machine (see Outcome::fault): a snippet is run at most this many times,
  // waiting retry_backoff_s, then twice that, ... between attempts.
  int fault_attempts = 3;
  double retry_backoff_s = 0.05;
  // A zygote that dies is started again at once; one that fails to start, after
  // restart_backoff_s, doubling up to restart_backoff_max_s, for ever. After
  // unavailable_after failed starts in a row the sandbox is "unavailable": queued and new
  // snippets fail at once (the caller raises SandboxError) until a start succeeds.
  double restart_backoff_s = 0.1;
  double restart_backoff_max_s = 30;
  int unavailable_after = 3;
  // The wall clock bounds every snippet at limit * wall_guard_factor + wall_guard_extra_s,
  // however long it waited for a CPU (the extra gives short limits room on a busy machine).
  double wall_guard_factor = 3;
  double wall_guard_extra_s = 5;
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
  bool infra_error = false;  // the sandbox cannot run snippets (closed, unavailable, refused)
  std::string infra_message;
  // A fault of the machine, not of the snippet, that persisted over every attempt:
  // "interpreter_lost" (the zygote died under it), "start_failed" (no process could be
  // started or set up for it), "host_resource" (the supervisor ran out of descriptors or
  // memory), "starved" (the wall-clock guard fired while the snippet had mostly waited for a
  // CPU). Empty for an outcome of the snippet's own (whatever its status).
  std::string fault;
  std::string out, err;
  bool truncated = false;  // output passed max_output_bytes; the snippet was killed
  int truncated_stream = 0;  // 1: stdout was cut, 2: stderr was cut
  bool timed_out = false;  // the snippet's own time passed its limit; it was killed
  bool cancelled = false;
  bool has_status = false;
  int wait_status = 0;
  int exit_code = 0;       // like subprocess: exit status, or -signal
  double wall_ms = 0;
  double cpu_ms = 0;
  double wait_ms = 0;      // of wall_ms, time spent runnable but waiting for a CPU (-1: unknown)
  int64_t maxrss_kb = 0;
  int attempts = 0;
};

// Counters only grow; gauges (queued ... ready) are the state at the time of the call.
struct SupervisorStats {
  uint64_t submitted = 0, executed = 0, timeouts = 0, output_limits = 0;
  uint64_t retries = 0;         // attempts repeated after a fault of the machine
  uint64_t restarts = 0;        // zygote starts after the first ready one (deaths and failed starts)
  uint64_t start_failures = 0;  // zygote starts that did not become ready
  uint64_t faults_interpreter_lost = 0, faults_start_failed = 0, faults_host_resource = 0, faults_starved = 0;
  uint64_t unavailable = 0;     // snippets failed because no zygote could be started
  size_t queued = 0, inflight = 0;
  size_t occupied_slots = 0;  // inflight + answered snippets whose process is still being torn down
  pid_t zygote_pid = -1;
  bool ready = false;
  bool available = true;  // false while the sandbox is unavailable (see SupervisorOptions)
};

class Supervisor {
 public:
  // Throws std::invalid_argument for bad options (the policy JSON included).
  explicit Supervisor(SupervisorOptions options);
  ~Supervisor();
  Supervisor(const Supervisor&) = delete;
  Supervisor& operator=(const Supervisor&) = delete;

  // Waits for the first zygote to be ready (imports and warm-up done). False, with the
  // reason, if it was refused (the machine cannot isolate as the policy asks), became
  // unavailable first, or did not get ready in time.
  bool wait_ready(double timeout_s, std::string* error);
  uint64_t submit(Job job);  // throws std::runtime_error once closed, refused or while unavailable
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
  const IsolationPolicy& policy() const { return policy_; }

 private:
  // Starting: a zygote was spawned, no ready report yet. Waiting: none runs; the next start
  // is due at restart_at_ns_. Refused: the machine cannot isolate as the policy asks (final).
  enum class ZState { Starting, Ready, Waiting, Refused };
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
    pid_t pid = -1;       // in the zygote's pid namespace
    pid_t host_pid = 0;   // the same process as this supervisor sees it (0: not looked up yet)
    Fd out_r, err_r, status_r;
    Fd code;  // the code memfd, kept until the outcome (see proto::kSetupFailedMark)
    Watch w_out{WatchKind::Out, nullptr}, w_err{WatchKind::Err, nullptr}, w_status{WatchKind::Status, nullptr};
    int64_t t_start_ns = 0, t_cell_ns = 0, deadline_ns = 0, guard_ns = 0, grace_ns = 0, kill_ns = 0, linger_ns = 0;
    int64_t replay_cpu_ns = 0;
    int64_t delay_base_ns = 0;  // the process's run delay when its cell started (not the cell's)
    int64_t not_before_ns = 0;  // a retry waits in the queue until then
    bool in_replay = false;
    bool kill_requested = false, kill_sent = false;
    std::string pending_fault;  // killed (or dying) for a fault of the machine: retried once gone
    std::string status_buf;
  };
  using RequestPtr = std::shared_ptr<Request>;

  void io_loop();
  void spawn_zygote();
  void zygote_died(const std::string& why);
  void start_failed(const std::string& why);
  void refuse(const std::string& why);
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
  void retry_or_fault(const RequestPtr& r, const std::string& reason);
  void deliver(Request* r);
  void release_slot(Request* r);
  void close_streams(Request* r);
  bool setup_failed(Request* r);
  RequestPtr in_slot(uint64_t id);
  void shutdown_all(const std::string& why);
  void fail_queued(const std::string& why);
  void epoll_add(int fd, Watch* w);
  void epoll_del(int fd);
  void kill_slot_processes();
  size_t active() const;
  int64_t own_time_ns(Request* r, int64_t now);
  pid_t host_pid_of(Request* r);
  std::vector<long> zygote_children() const;
  int64_t run_delay_ns(Request* r);
  int64_t tree_cpu_ns(Request* r);
  std::string unavailable_message() const;

  SupervisorOptions opt_;
  IsolationPolicy policy_;
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
  std::string refusal_;     // why the sandbox refused to start (ZState::Refused)
  std::string last_start_error_;

  Fd epoll_, wake_fd_, notify_fd_;
  Fd ctrl_, log_;
  Fd zygote_stdin_;  // write end of the zygote's stdin: held open, never written
  pid_t zygote_pid_ = -1;
  NamespaceSet ns_;
  bool drop_uid_ = false;
  ZState zstate_ = ZState::Waiting;
  bool ever_ready_ = false;
  int failed_starts_ = 0;  // in a row
  int64_t startup_deadline_ns_ = 0, restart_at_ns_ = 0;
  std::string ready_json_, log_tail_, host_work_root_;
  Watch w_ctrl_{WatchKind::Ctrl, nullptr}, w_log_{WatchKind::Log, nullptr}, w_wake_{WatchKind::Wake, nullptr};
  SupervisorStats stats_;
  std::thread thread_;
};

}  // namespace cir::sandbox
