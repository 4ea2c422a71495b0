#include "sandbox/json.h"

#include <cmath>
#include <cstdlib>
#include <stdexcept>

namespace cir::sandbox::json {

const char* Value::kind_name() const {
  switch (kind) {
    case Kind::Null:
      return "null";
    case Kind::Bool:
      return "a boolean";
    case Kind::Number:
      return "a number";
    case Kind::String:
      return "a string";
    case Kind::Array:
      return "an array";
    case Kind::Object:
      return "an object";
  }
  return "?";
}

namespace {

class Parser {
 public:
  explicit Parser(const std::string& text) : s_(text) {}

  Value document() {
    Value v = value(0);
    skip_space();
    if (pos_ != s_.size()) fail("trailing characters");
    return v;
  }

 private:
  [[noreturn]] void fail(const std::string& what) const {
    throw std::invalid_argument("JSON: " + what + " at offset " + std::to_string(pos_));
  }

  void skip_space() {
    while (pos_ < s_.size() && (s_[pos_] == ' ' || s_[pos_] == '\n' || s_[pos_] == '\r' || s_[pos_] == '\t')) ++pos_;
  }

  bool take(const char* word) {
    size_t n = std::char_traits<char>::length(word);
    if (s_.compare(pos_, n, word) != 0) return false;
    pos_ += n;
    return true;
  }

  Value value(int depth) {
    if (depth > 64) fail("nesting too deep");
    skip_space();
    if (pos_ >= s_.size()) fail("unexpected end");
    Value v;
    char c = s_[pos_];
    if (c == '{') {
      v.kind = Value::Kind::Object;
      ++pos_;
      skip_space();
      if (pos_ < s_.size() && s_[pos_] == '}') {
        ++pos_;
        return v;
      }
      for (;;) {
        skip_space();
        if (pos_ >= s_.size() || s_[pos_] != '"') fail("expected a key");
        std::string key = string_literal();
        skip_space();
        if (pos_ >= s_.size() || s_[pos_] != ':') fail("expected ':'");
        ++pos_;
        v.object[key] = value(depth + 1);
        skip_space();
        if (pos_ < s_.size() && s_[pos_] == ',') {
          ++pos_;
          continue;
        }
        if (pos_ < s_.size() && s_[pos_] == '}') {
          ++pos_;
          return v;
        }
        fail("expected ',' or '}'");
      }
    }
    if (c == '[') {
      v.kind = Value::Kind::Array;
      ++pos_;
      skip_space();
      if (pos_ < s_.size() && s_[pos_] == ']') {
        ++pos_;
        return v;
      }
      for (;;) {
        v.array.push_back(value(depth + 1));
        skip_space();
        if (pos_ < s_.size() && s_[pos_] == ',') {
          ++pos_;
          continue;
        }
        if (pos_ < s_.size() && s_[pos_] == ']') {
          ++pos_;
          return v;
        }
        fail("expected ',' or ']'");
      }
    }
    if (c == '"') {
      v.kind = Value::Kind::String;
      v.string = string_literal();
      return v;
    }
    if (take("true")) {
      v.kind = Value::Kind::Bool;
      v.boolean = true;
      return v;
    }
    if (take("false")) {
      v.kind = Value::Kind::Bool;
      return v;
    }
    if (take("null")) return v;
    const char* start = s_.c_str() + pos_;
    char* end = nullptr;
    double d = std::strtod(start, &end);
    if (end == start || !std::isfinite(d)) fail("expected a value");
    pos_ += size_t(end - start);
    v.kind = Value::Kind::Number;
    v.number = d;
    return v;
  }

  static void put_utf8(std::string* out, uint32_t cp) {
    if (cp < 0x80) {
      *out += char(cp);
    } else if (cp < 0x800) {
      *out += char(0xC0 | (cp >> 6));
      *out += char(0x80 | (cp & 0x3F));
    } else if (cp < 0x10000) {
      *out += char(0xE0 | (cp >> 12));
      *out += char(0x80 | ((cp >> 6) & 0x3F));
      *out += char(0x80 | (cp & 0x3F));
    } else {
      *out += char(0xF0 | (cp >> 18));
      *out += char(0x80 | ((cp >> 12) & 0x3F));
      *out += char(0x80 | ((cp >> 6) & 0x3F));
      *out += char(0x80 | (cp & 0x3F));
    }
  }

  uint32_t hex4() {
    if (pos_ + 4 > s_.size()) fail("short \\u escape");
    uint32_t v = 0;
    for (int i = 0; i < 4; ++i) {
      char h = s_[pos_++];
      v <<= 4;
      if (h >= '0' && h <= '9')
        v |= uint32_t(h - '0');
      else if (h >= 'a' && h <= 'f')
        v |= uint32_t(h - 'a' + 10);
      else if (h >= 'A' && h <= 'F')
        v |= uint32_t(h - 'A' + 10);
      else
        fail("bad \\u escape");
    }
    return v;
  }

  std::string string_literal() {
    ++pos_;  // the opening quote
    std::string out;
    while (pos_ < s_.size()) {
      char c = s_[pos_++];
      if (c == '"') return out;
      if (c != '\\') {
        out += c;
        continue;
      }
      if (pos_ >= s_.size()) break;
      char e = s_[pos_++];
      switch (e) {
        case '"':
        case '\\':
        case '/':
          out += e;
          break;
        case 'b':
          out += '\b';
          break;
        case 'f':
          out += '\f';
          break;
        case 'n':
          out += '\n';
          break;
        case 'r':
          out += '\r';
          break;
        case 't':
          out += '\t';
          break;
        case 'u': {
          uint32_t cp = hex4();
          if (cp >= 0xD800 && cp < 0xDC00 && s_.compare(pos_, 2, "\\u") == 0) {
            pos_ += 2;
            uint32_t low = hex4();
            cp = 0x10000 + ((cp - 0xD800) << 10) + (low - 0xDC00);
          }
          put_utf8(&out, cp);
          break;
        }
        default:
          fail("bad escape");
      }
    }
    fail("unterminated string");
  }

  const std::string& s_;
  size_t pos_ = 0;
};

const Value& need(const Value& object, const std::string& key, Value::Kind kind, const char* what) {
  const Value* v = member(object, key);
  if (v == nullptr) throw std::invalid_argument("\"" + key + "\" is missing");
  if (v->kind != kind) throw std::invalid_argument("\"" + key + "\" must be " + what + ", not " + v->kind_name());
  return *v;
}

}  // namespace

Value parse(const std::string& text) { return Parser(text).document(); }

const Value* member(const Value& object, const std::string& key) {
  if (object.kind != Value::Kind::Object) return nullptr;
  auto it = object.object.find(key);
  return it == object.object.end() ? nullptr : &it->second;
}

bool get_bool(const Value& object, const std::string& key) {
  return need(object, key, Value::Kind::Bool, "a boolean").boolean;
}

double get_number(const Value& object, const std::string& key) {
  return need(object, key, Value::Kind::Number, "a number").number;
}

uint64_t get_uint(const Value& object, const std::string& key) {
  double d = get_number(object, key);
  if (d < 0 || d != std::floor(d) || d > 9.0e15)
    throw std::invalid_argument("\"" + key + "\" must be a non-negative integer");
  return uint64_t(d);
}

std::string get_string(const Value& object, const std::string& key) {
  return need(object, key, Value::Kind::String, "a string").string;
}

std::vector<std::string> get_strings(const Value& object, const std::string& key) {
  const Value& a = need(object, key, Value::Kind::Array, "an array of strings");
  std::vector<std::string> out;
  for (const Value& v : a.array) {
    if (v.kind != Value::Kind::String) throw std::invalid_argument("\"" + key + "\" must hold strings only");
    out.push_back(v.string);
  }
  return out;
}

}  // namespace cir::sandbox::json
