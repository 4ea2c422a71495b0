#include "sandbox/policy.h"

#include <set>
#include <stdexcept>

#include "sandbox/json.h"

namespace cir::sandbox {

std::vector<std::string> IsolationPolicy::field_names() {
  return {"namespaces",     "network",         "uid_per_slot",           "extra_readonly_paths",
          "work_dir_bytes", "work_dir_inodes", "accept_weaker_isolation"};
}

IsolationPolicy IsolationPolicy::from_json(const std::string& text) {
  json::Value v;
  try {
    v = json::parse(text);
  } catch (const std::invalid_argument& e) {
    throw std::invalid_argument(std::string("isolation policy: ") + e.what());
  }
  if (v.kind != json::Value::Kind::Object) throw std::invalid_argument("isolation policy: not a JSON object");
  std::vector<std::string> names = field_names();
  std::set<std::string> known(names.begin(), names.end());
  for (const auto& kv : v.object)
    if (!known.count(kv.first)) throw std::invalid_argument("isolation policy: unknown field \"" + kv.first + "\"");
  IsolationPolicy p;
  try {
    p.namespaces = json::get_bool(v, "namespaces");
    p.network = json::get_bool(v, "network");
    p.uid_per_slot = json::get_bool(v, "uid_per_slot");
    p.extra_readonly_paths = json::get_strings(v, "extra_readonly_paths");
    p.work_dir_bytes = json::get_uint(v, "work_dir_bytes");
    p.work_dir_inodes = json::get_uint(v, "work_dir_inodes");
    p.accept_weaker_isolation = json::get_bool(v, "accept_weaker_isolation");
  } catch (const std::invalid_argument& e) {
    throw std::invalid_argument(std::string("isolation policy: ") + e.what());
  }
  for (const std::string& path : p.extra_readonly_paths)
    if (path.empty() || path[0] != '/')
      throw std::invalid_argument("isolation policy: extra_readonly_paths must be absolute, got \"" + path + "\"");
  if (p.work_dir_bytes < 1ULL << 20) throw std::invalid_argument("isolation policy: work_dir_bytes must be >= 1 MiB");
  if (p.work_dir_inodes < 16) throw std::invalid_argument("isolation policy: work_dir_inodes must be >= 16");
  return p;
}

}  // namespace cir::sandbox
