// Drives the sandbox supervisor (src/sandbox, plain C++) the way cir.sandbox's asyncio path
// does: many snippets in flight (answers, errors, timeouts, output floods, cancellations), completion announced on notify_fd(), outcomes collected with
// take_notified() from this (the caller's) thread while the supervisor's I/O thread keeps
// tearing finished processes down. tests/test_supervisor_native.py builds it with
// AddressSanitizer, so any use of freed memory in the supervisor fails the test.
//
// Usage: supervisor_driver SPEC_FILE SNIPPETS IN_FLIGHT
// SPEC_FILE holds NUL-separated fields: executable, argc, argv..., envc, env..., config_json,
// policy_json, workers (written by the test from cir.sandbox's own launch settings).
#include <poll.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iterator>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "sandbox/supervisor.h"

namespace sb = cir::sandbox;

namespace {

std::vector<std::string> read_fields(const char* path) {
  std::ifstream in(path, std::ios::binary);
  std::string all((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  std::vector<std::string> fields;
  std::string cur;
  for (char c : all) {
    if (c == '\0') {
      fields.push_back(cur);
      cur.clear();
    } else {
      cur.push_back(c);
    }
  }
  if (!cur.empty()) fields.push_back(cur);
  return fields;
}

// What snippet i does, and what its outcome must be.
enum class Kind { Print, PrintFlush, Timeout, Flood, Cancel, Error };

Kind kind_of(int i) {
  if (i % 11 == 5) return Kind::Timeout;
  if (i % 13 == 6) return Kind::Flood;
  if (i % 7 == 3) return Kind::Cancel;
  if (i % 9 == 4) return Kind::Error;
  return i % 2 ? Kind::Print : Kind::PrintFlush;
}

sb::Job job_for(int i) {
  sb::Job j;
  j.timeout_s = 20;
  switch (kind_of(i)) {
    case Kind::Print:
      j.code = "print(" + std::to_string(i) + " * 7)\n";
      break;
    case Kind::PrintFlush:  // answers before its process is torn down
      j.code = "import sys\nprint(" + std::to_string(i) + " * 7)\nsys.stdout.flush()\n";
      break;
    case Kind::Timeout:
      j.code = "while True:\n    pass\n";
      j.timeout_s = 0.3;
      break;
    case Kind::Flood:  // past max_output_bytes: cut and killed
      j.code = "while True:\n    print('x' * 1000)\n";
      break;
    case Kind::Cancel:  // cancelled right after submission (queued or running)
      j.code = "import time\ntime.sleep(5)\n";
      break;
    case Kind::Error:
      j.code = "raise ValueError('boom " + std::to_string(i) + "')\n";
      break;
  }
  j.as_bytes = uint64_t(2) << 30;
  j.cpu_seconds = 20;
  j.fsize_bytes = uint64_t(16) << 20;
  j.nproc = 64;
  j.nofile = 256;
  j.notify = true;
  return j;
}

// Empty when the outcome is what snippet i must give, else what is wrong.
std::string check(int i, const sb::Outcome& o) {
  if (o.infra_error) return "infra error: " + o.infra_message;
  if (!o.fault.empty()) return "sandbox fault: " + o.fault;
  switch (kind_of(i)) {
    case Kind::Print:
    case Kind::PrintFlush:
      if (o.exit_code != 0 || o.out != std::to_string(i * 7) + "\n") return "stdout " + o.out + " exit " + std::to_string(o.exit_code);
      return "";
    case Kind::Timeout:
      return o.timed_out ? "" : "not timed out";
    case Kind::Flood:
      return o.truncated && o.truncated_stream == 1 ? "" : "not truncated";
    case Kind::Cancel:
      return o.cancelled ? "" : "not cancelled";
    case Kind::Error:
      if (o.exit_code != 1 || o.err.find("ValueError: boom " + std::to_string(i)) == std::string::npos)
        return "stderr " + o.err + " exit " + std::to_string(o.exit_code);
      return "";
  }
  return "unknown kind";
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 4) {
    std::fprintf(stderr, "usage: %s SPEC_FILE SNIPPETS IN_FLIGHT\n", argv[0]);
    return 2;
  }
  std::vector<std::string> f = read_fields(argv[1]);
  const int total = std::atoi(argv[2]);
  const int in_flight = std::atoi(argv[3]);
  size_t k = 0;
  auto next = [&]() -> const std::string& {
    if (k >= f.size()) {
      std::fprintf(stderr, "spec file too short\n");
      std::exit(2);
    }
    return f[k++];
  };
  sb::SupervisorOptions o;
  o.executable = next();
  int n_argv = std::stoi(next());
  for (int i = 0; i < n_argv; ++i) o.zygote_argv.push_back(next());
  int n_env = std::stoi(next());
  for (int i = 0; i < n_env; ++i) o.zygote_env.push_back(next());
  o.zygote_config_json = next();
  o.policy_json = next();
  o.workers = std::stoi(next());
  o.max_output_bytes = 64 * 1024;

  sb::Supervisor s(o);
  std::string err;
  if (!s.wait_ready(300, &err)) {
    std::fprintf(stderr, "not ready: %s\n", err.c_str());
    return 3;
  }
  std::map<uint64_t, int> pending;  // request id -> snippet index
  int submitted = 0, done = 0, wrong = 0;
  while (done < total) {
    while (submitted < total && int(pending.size()) < in_flight) {
      uint64_t id = s.submit(job_for(submitted));
      pending[id] = submitted;
      if (kind_of(submitted) == Kind::Cancel) s.cancel(id);
      ++submitted;
    }
    pollfd p{s.notify_fd(), POLLIN, 0};
    int rc = poll(&p, 1, 30000);
    if (rc == 0) {
      std::fprintf(stderr, "no completion within 30 s (%d of %d done)\n", done, total);
      return 4;
    }
    for (auto& [id, out] : s.take_notified()) {
      auto it = pending.find(id);
      if (it == pending.end()) {
        std::fprintf(stderr, "unknown request id %llu\n", static_cast<unsigned long long>(id));
        return 5;
      }
      std::string why = check(it->second, out);
      if (!why.empty()) {
        if (wrong < 5) std::fprintf(stderr, "snippet %d: %s\n", it->second, why.c_str());
        ++wrong;
      }
      pending.erase(it);
      ++done;
    }
  }
  s.close();
  sb::SupervisorStats st = s.stats();
  std::printf("done %d wrong %d executed %llu restarts %llu\n", done, wrong,
              static_cast<unsigned long long>(st.executed), static_cast<unsigned long long>(st.restarts));
  return wrong == 0 ? 0 : 1;
}
