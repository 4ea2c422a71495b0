// A small JSON reader: enough for the isolation policy and the zygote's set-up plan, which
// the Python side writes with json.dumps (objects, arrays, strings, numbers, booleans, null).
// Plain C++, no dependency; throws std::invalid_argument naming what is wrong and where.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

namespace cir::sandbox::json {

struct Value {
  enum class Kind { Null, Bool, Number, String, Array, Object };
  Kind kind = Kind::Null;
  bool boolean = false;
  double number = 0;
  std::string string;
  std::vector<Value> array;
  std::map<std::string, Value> object;

  const char* kind_name() const;
};

// Parses the whole of `text` (trailing whitespace only).
Value parse(const std::string& text);

// Typed access to one member of an object, with the member's name in every error.
const Value* member(const Value& object, const std::string& key);  // nullptr when absent
bool get_bool(const Value& object, const std::string& key);
uint64_t get_uint(const Value& object, const std::string& key);
double get_number(const Value& object, const std::string& key);
std::string get_string(const Value& object, const std::string& key);
std::vector<std::string> get_strings(const Value& object, const std::string& key);

}  // namespace cir::sandbox::json
