#include "sandbox/util.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <stdexcept>

namespace cir::sandbox {

int64_t monotonic_ns() {
  timespec ts{};
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return int64_t(ts.tv_sec) * 1000000000LL + ts.tv_nsec;
}

void Fd::reset(int fd) {
  if (fd_ >= 0) ::close(fd_);
  fd_ = fd;
}

std::string errno_message(const std::string& what) {
  int e = errno;
  return what + ": " + std::strerror(e);
}

void throw_errno(const std::string& what) { throw std::runtime_error(errno_message(what)); }

void set_nonblocking(int fd, bool on) {
  int fl = fcntl(fd, F_GETFL);
  if (fl < 0) return;
  fcntl(fd, F_SETFL, on ? (fl | O_NONBLOCK) : (fl & ~O_NONBLOCK));
}

void set_cloexec(int fd, bool on) {
  int fl = fcntl(fd, F_GETFD);
  if (fl < 0) return;
  fcntl(fd, F_SETFD, on ? (fl | FD_CLOEXEC) : (fl & ~FD_CLOEXEC));
}

bool write_all(int fd, const void* data, size_t len) {
  const char* p = static_cast<const char*>(data);
  while (len > 0) {
    ssize_t n = ::write(fd, p, len);
    if (n < 0) {
      if (errno == EINTR) continue;
      return false;
    }
    p += n;
    len -= size_t(n);
  }
  return true;
}

bool read_whole_fd(int fd, std::string* out) {
  out->clear();
  char buf[65536];
  off_t off = 0;
  for (;;) {
    ssize_t n = ::pread(fd, buf, sizeof buf, off);
    if (n < 0) {
      if (errno == EINTR) continue;
      return false;
    }
    if (n == 0) return true;
    out->append(buf, size_t(n));
    off += n;
  }
}

bool read_file(const char* path, std::string* out) {
  int fd = ::open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return false;
  out->clear();
  char buf[8192];
  bool ok = true;
  for (;;) {
    ssize_t n = ::read(fd, buf, sizeof buf);
    if (n < 0) {
      if (errno == EINTR) continue;
      ok = false;
      break;
    }
    if (n == 0) break;
    out->append(buf, size_t(n));
  }
  ::close(fd);
  return ok;
}

int make_memfd(const char* name, const std::string& data) {
  int fd = int(syscall(SYS_memfd_create, name, MFD_CLOEXEC));
  if (fd < 0) {
    // Kernels without memfd: an unlinked temporary file does the same job.
    char path[] = "/tmp/cir-code-XXXXXX";
    fd = mkostemp(path, O_CLOEXEC);
    if (fd < 0) return -1;
    unlink(path);
  }
  if (!write_all(fd, data.data(), data.size())) {
    ::close(fd);
    return -1;
  }
  return fd;
}

bool send_packet(int sock, const void* data, size_t len, const int* fds, size_t nfds) {
  iovec iov{const_cast<void*>(data), len};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  alignas(cmsghdr) char ctrl[CMSG_SPACE(sizeof(int) * 8)];
  if (nfds > 8) {
    errno = EINVAL;
    return false;
  }
  if (nfds > 0) {
    std::memset(ctrl, 0, sizeof ctrl);
    msg.msg_control = ctrl;
    msg.msg_controllen = CMSG_SPACE(sizeof(int) * nfds);
    cmsghdr* c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int) * nfds);
    std::memcpy(CMSG_DATA(c), fds, sizeof(int) * nfds);
  }
  for (;;) {
    ssize_t n = ::sendmsg(sock, &msg, MSG_NOSIGNAL);
    if (n < 0 && errno == EINTR) continue;
    return n == ssize_t(len);
  }
}

ssize_t recv_packet(int sock, void* buf, size_t cap, std::vector<int>* fds) {
  iovec iov{buf, cap};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  alignas(cmsghdr) char ctrl[CMSG_SPACE(sizeof(int) * 16)];
  msg.msg_control = ctrl;
  msg.msg_controllen = sizeof ctrl;
  ssize_t n;
  do {
    n = ::recvmsg(sock, &msg, MSG_CMSG_CLOEXEC);
  } while (n < 0 && errno == EINTR);
  if (n < 0) return -1;
  for (cmsghdr* c = CMSG_FIRSTHDR(&msg); c != nullptr; c = CMSG_NXTHDR(&msg, c)) {
    if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS) {
      size_t k = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
      const int* p = reinterpret_cast<const int*>(CMSG_DATA(c));
      for (size_t i = 0; i < k; ++i) fds->push_back(p[i]);
    }
  }
  return n;
}

// Removes the entries of the open directory `dfd` (consumed), recursing with openat so that
// a symlink planted by a snippet is unlinked, never followed.
static bool remove_entries(int dfd) {
  DIR* d = fdopendir(dfd);
  if (d == nullptr) {
    ::close(dfd);
    return false;
  }
  bool ok = true;
  std::vector<std::string> names;
  while (dirent* e = readdir(d)) {
    if (std::strcmp(e->d_name, ".") == 0 || std::strcmp(e->d_name, "..") == 0) continue;
    names.emplace_back(e->d_name);
  }
  int fd = dirfd(d);
  for (const std::string& name : names) {
    if (unlinkat(fd, name.c_str(), 0) == 0 || errno == ENOENT) continue;
    if (errno != EISDIR && errno != EPERM) {
      ok = false;
      continue;
    }
    int sub = openat(fd, name.c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    if (sub < 0) {
      ok = false;
      continue;
    }
    // A snippet may have made its directories unreadable to everyone; root can read them
    // anyway, a non-root owner restores the permission first.
    fchmod(sub, 0700);
    if (!remove_entries(sub)) ok = false;
    if (unlinkat(fd, name.c_str(), AT_REMOVEDIR) != 0 && errno != ENOENT) ok = false;
  }
  closedir(d);
  return ok;
}

bool remove_tree(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
  if (fd < 0) return errno == ENOENT;
  fchmod(fd, 0700);
  remove_entries(fd);
  return ::rmdir(path.c_str()) == 0 || errno == ENOENT;
}

int64_t self_vm_size_bytes() {
  std::string s;
  if (!read_file("/proc/self/status", &s)) return -1;
  size_t p = s.find("VmSize:");
  if (p == std::string::npos) return -1;
  return std::strtoll(s.c_str() + p + 7, nullptr, 10) * 1024;
}

int64_t collapse_into_huge_pages() {
#ifndef MADV_COLLAPSE
  constexpr int kMadvCollapse = 25;
#else
  constexpr int kMadvCollapse = MADV_COLLAPSE;
#endif
  std::string maps;
  if (!read_file("/proc/self/maps", &maps)) return 0;
  constexpr uintptr_t kHuge = uintptr_t(1) << 21;
  size_t pos = 0;
  while (pos < maps.size()) {
    size_t end = maps.find('\n', pos);
    if (end == std::string::npos) end = maps.size();
    std::string line = maps.substr(pos, end - pos);
    pos = end + 1;
    // "lo-hi perms offset dev inode [path]": private writable anonymous memory only.
    char perms[8] = {0};
    unsigned long lo = 0, hi = 0, inode = 0;
    char path[256] = {0};
    int n = std::sscanf(line.c_str(), "%lx-%lx %7s %*s %*s %lu %255s", &lo, &hi, perms, &inode, path);
    if (n < 4 || perms[0] != 'r' || perms[1] != 'w' || perms[3] != 'p' || inode != 0) continue;
    if (n == 5 && std::strcmp(path, "[heap]") != 0) continue;  // [stack], [vvar], ...
    uintptr_t a = (uintptr_t(lo) + kHuge - 1) & ~(kHuge - 1);
    uintptr_t b = uintptr_t(hi) & ~(kHuge - 1);
    if (b <= a) continue;
    void* p = reinterpret_cast<void*>(a);
    if (madvise(p, b - a, MADV_HUGEPAGE) != 0) continue;
    madvise(p, b - a, kMadvCollapse);
    madvise(p, b - a, MADV_NOHUGEPAGE);
  }
  std::string rollup;
  if (!read_file("/proc/self/smaps_rollup", &rollup)) return 0;
  size_t at = rollup.find("AnonHugePages:");
  if (at == std::string::npos) return 0;
  return std::strtoll(rollup.c_str() + at + 14, nullptr, 10) * 1024;
}

int64_t run_delay_of(const std::string& pid) {
  std::string text;
  if (!read_file(("/proc/" + pid + "/schedstat").c_str(), &text)) return -1;
  unsigned long long on_cpu = 0, waited = 0;
  if (std::sscanf(text.c_str(), "%llu %llu", &on_cpu, &waited) != 2) return -1;
  return int64_t(waited);
}

long count_tasks_of_uid(uid_t uid) {
  DIR* d = opendir("/proc");
  if (d == nullptr) return 0;
  long total = 0;
  while (dirent* e = readdir(d)) {
    if (e->d_name[0] < '0' || e->d_name[0] > '9') continue;
    std::string status;
    if (!read_file(("/proc/" + std::string(e->d_name) + "/status").c_str(), &status)) continue;
    size_t u = status.find("\nUid:");
    size_t t = status.find("\nThreads:");
    if (u == std::string::npos || t == std::string::npos) continue;
    if (uid_t(std::strtoul(status.c_str() + u + 5, nullptr, 10)) != uid) continue;
    total += std::strtol(status.c_str() + t + 9, nullptr, 10);
  }
  closedir(d);
  return total;
}

}  // namespace cir::sandbox
