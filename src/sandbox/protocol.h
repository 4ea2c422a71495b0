// Messages between the supervisor (training process) and the zygote (warm interpreter).
//
// The two talk over one AF_UNIX SOCK_SEQPACKET socket pair: every message is one packet,
// so descriptors passed with SCM_RIGHTS arrive attached to exactly the request they belong
// to. The snippet's code travels in a memfd (any size), never in the packet.
#pragma once

#include <cstdint>

namespace cir::sandbox::proto {

enum class Type : uint32_t {
  // supervisor -> zygote
  Hello = 1,     // + JSON text: namespaces in effect, work root, the Python-side options
  Run = 2,       // RunRequest + fds [code memfd (read-write: see kSetupFailedMark), stdout, stderr, status write ends]
  Kill = 3,      // KillRequest: kill the snippet and everything it started
  Shutdown = 4,  //
  // zygote -> supervisor
  Ready = 10,    // + JSON text: isolation facts, memory baseline, warm-up timings
  Started = 11,  // StartedReport
  Exited = 12,   // ExitedReport
  Failed = 13,   // FailedReport: the zygote could not start the snippet (fork failed, ...)
  Refused = 14,  // + text: the zygote cannot isolate as the policy asks (one line); it exits
};

struct Header {
  Type type;
  uint32_t length;  // bytes of text following the header (Hello / Ready / Refused)
};

// Ready: Header, then ReadyFlags, then the JSON text.
enum ReadyFlags : uint32_t {
  kUsesHostWorkRoot = 1,  // no private /tmp: the work dirs live in the host directory from Hello
};

struct RunRequest {
  Type type;
  uint32_t slot;
  uint64_t req_id;
  uint64_t as_bytes;     // RLIMIT_AS budget beyond the zygote's own baseline
  uint64_t cpu_seconds;  // RLIMIT_CPU soft limit (hard = soft + 1)
  uint64_t fsize_bytes;  // RLIMIT_FSIZE
  uint32_t nproc;        // RLIMIT_NPROC
  uint32_t nofile;       // RLIMIT_NOFILE
};

struct KillRequest {
  Type type;
  uint32_t slot;
  uint64_t req_id;
};

struct StartedReport {
  Type type;
  int32_t pid;  // in the zygote's pid namespace
  uint64_t req_id;
  int64_t t_start_ns;  // CLOCK_MONOTONIC when the snippet got its process (fork or spare)
  // The process's run delay (time runnable but waiting for a CPU) up to then, from the
  // scheduler's statistics: a spare's from before its request is not the snippet's. -1: unknown.
  int64_t run_delay_ns;
};

struct ExitedReport {
  Type type;
  int32_t wait_status;  // as from wait4
  uint64_t req_id;
  int64_t t_end_ns;
  int64_t utime_us;  // user CPU of the snippet process and the children it waited for
  int64_t stime_us;
  int64_t maxrss_kb;
};

struct FailedReport {
  Type type;
  int32_t error;  // errno
  uint64_t req_id;
};

// Records a snippet writes on its status pipe (a descriptor it gets besides 0/1/2).
enum class StatusKind : int32_t {
  ReplayDone = 1,  // session cell: the replayed history has run; the new cell starts now
  Done = 2,        // the code has run, output is flushed; the process exits with `status` next
};

// A process that could not be set up for its snippet (the machine's fault, not the code's)
// writes this over the start of the snippet's code memfd and exits with kSetupFailedExit.
// Not on the status pipe: the snippet's code can write there, and must not be able to make
// its own result a fault of the machine. The memfd is closed before the code runs.
constexpr char kSetupFailedMark[8] = {'c', 'i', 'r', '-', 's', 'e', 't', 'u'};
constexpr int kSetupFailedExit = 71;

struct StatusRecord {
  StatusKind kind;
  int32_t status;      // Done: exit status the process is about to exit with (or -signal)
  int64_t cpu_ns;      // process CPU time so far, including children it waited for
  int64_t maxrss_kb;
  int64_t t_ns;        // CLOCK_MONOTONIC when the record was written
  int64_t run_delay_ns;  // ReplayDone: the process's run delay so far (-1: unknown; else 0)
};

// Zygote -> pre-forked spare child: the request it is to run.
struct Assignment {
  RunRequest req;
  uint32_t uid;
  uint32_t gid;
  char workdir[512];
};

}  // namespace cir::sandbox::proto
