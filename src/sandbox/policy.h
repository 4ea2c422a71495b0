// The isolation policy: one description of how snippets are isolated, written by the Python
// side (cir.sandbox.policy.IsolationPolicy, serialised with to_json) and read here by the
// supervisor (namespaces, uids, whether weaker isolation is acceptable) and by the zygote
// (the filesystem view, the work directories' caps, the network). Both sides name the same
// fields; from_json rejects a missing or unknown one, so the two cannot drift apart silently.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace cir::sandbox {

struct IsolationPolicy {
  bool namespaces = true;    // pid, network, mount and IPC namespaces (and a user namespace when not root)
  bool network = false;      // snippets keep the host's network
  bool uid_per_slot = true;  // as root: one unprivileged uid per worker slot
  // Read-only paths shown to snippets beyond what the interpreter needs: visible to the policy.
  std::vector<std::string> extra_readonly_paths;
  uint64_t work_dir_bytes = 64ULL << 20;  // a snippet's writable space: bytes ...
  uint64_t work_dir_inodes = 4096;        // ... and files (each worker slot its own tmpfs)
  // Start even where the machine cannot provide the isolation above (no mount or user
  // namespace): snippets then see the host's files, as far as permissions allow.
  bool accept_weaker_isolation = false;

  // Throws std::invalid_argument naming the field at fault.
  static IsolationPolicy from_json(const std::string& text);
  static std::vector<std::string> field_names();
};

}  // namespace cir::sandbox
