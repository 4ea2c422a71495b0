// Small POSIX helpers shared by the supervisor (in the training process) and the zygote.
#pragma once

#include <sys/types.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace cir::sandbox {

// CLOCK_MONOTONIC in nanoseconds: comparable between the supervisor and the zygote (and
// across pid namespaces), so the zygote can stamp when a snippet started.
int64_t monotonic_ns();

// Owns one file descriptor; closes it on destruction.
class Fd {
 public:
  Fd() = default;
  explicit Fd(int fd) : fd_(fd) {}
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  Fd(Fd&& o) noexcept : fd_(o.release()) {}
  Fd& operator=(Fd&& o) noexcept {
    if (this != &o) reset(o.release());
    return *this;
  }
  ~Fd() { reset(); }
  int get() const { return fd_; }
  bool valid() const { return fd_ >= 0; }
  int release() {
    int f = fd_;
    fd_ = -1;
    return f;
  }
  void reset(int fd = -1);

 private:
  int fd_ = -1;
};

// "what: strerror(errno)". Captures errno at call time.
std::string errno_message(const std::string& what);
[[noreturn]] void throw_errno(const std::string& what);

void set_nonblocking(int fd, bool on);
void set_cloexec(int fd, bool on);

// Writes everything, retrying on EINTR/short writes (blocking fds only).
bool write_all(int fd, const void* data, size_t len);
// Reads the whole content of a (seekable) file descriptor from offset 0.
bool read_whole_fd(int fd, std::string* out);
bool read_file(const char* path, std::string* out);

// A sealed-size anonymous memory file holding `data`, positioned at 0.
int make_memfd(const char* name, const std::string& data);

// One SOCK_SEQPACKET message with attached descriptors.
bool send_packet(int sock, const void* data, size_t len, const int* fds, size_t nfds);
// Receives one message; received descriptors are appended to `fds` (always CLOEXEC).
// Returns the message length, 0 on orderly shutdown, -1 on error (errno set; EAGAIN for
// a non-blocking socket with nothing to read).
ssize_t recv_packet(int sock, void* buf, size_t cap, std::vector<int>* fds);

// Removes a directory tree without following symbolic links. `path` itself must not be a
// symlink. Returns true when the tree is gone.
bool remove_tree(const std::string& path);

// Virtual memory size of this process in bytes (VmSize of /proc/self/status), -1 if unknown.
int64_t self_vm_size_bytes();

// Re-maps this process's anonymous heap memory with transparent huge pages (MADV_COLLAPSE,
// Linux 6.1+), then clears the hint so later allocations behave as usual. A fork then copies
// one page-table entry per 2 MiB instead of 512, and the child's exit tears down as few:
// the zygote's dominant per-snippet cost. Returns the bytes now backed by huge pages (0 where
// the kernel cannot do it).
int64_t collapse_into_huge_pages();

// Time the task spent runnable but waiting for a CPU, in ns, from /proc/<pid>/schedstat
// ("self" for the caller); -1 where the kernel does not report it.
int64_t run_delay_of(const std::string& pid);

// Number of tasks (threads) owned by real uid `uid`, counted from /proc. Used to set
// RLIMIT_NPROC when snippets cannot get a uid of their own.
long count_tasks_of_uid(uid_t uid);

}  // namespace cir::sandbox
