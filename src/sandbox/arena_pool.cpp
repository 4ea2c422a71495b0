#include "sandbox/arena_pool.h"

#include <sys/mman.h>

#include <algorithm>
#include <vector>

namespace cir::sandbox::arena_pool {

namespace {

constexpr uintptr_t kChunk = uintptr_t(1) << 21;  // one PMD-mapped huge page on x86-64 / arm64 (4 KiB base pages)

struct Chunk {
  uintptr_t base;
  size_t slot_size;
  uint64_t used;  // bit per slot (at most 64 slots: arenas of 32 KiB or more)
};

struct State {
  bool active = false;
  std::vector<Chunk> chunks;
  size_t fallback_arenas = 0;
};

State& state() {
  static State* s = new State;  // never destroyed: arenas may be freed during interpreter exit
  return *s;
}

void* plain_map(size_t size) {
  void* p = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  return p == MAP_FAILED ? nullptr : p;
}

// A fresh 2 MiB-aligned chunk: map twice the size, keep the aligned middle.
uintptr_t map_chunk() {
  void* p = mmap(nullptr, 2 * kChunk, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) return 0;
  uintptr_t lo = reinterpret_cast<uintptr_t>(p);
  uintptr_t base = (lo + kChunk - 1) & ~(kChunk - 1);
  if (base > lo) munmap(p, base - lo);
  uintptr_t hi = lo + 2 * kChunk;
  if (hi > base + kChunk) munmap(reinterpret_cast<void*>(base + kChunk), hi - (base + kChunk));
  return base;
}

bool poolable(size_t size) { return size >= (kChunk / 64) && size <= kChunk && kChunk % size == 0; }

std::vector<Chunk>::iterator find_chunk(State& s, uintptr_t p) {
  uintptr_t base = p & ~(kChunk - 1);
  return std::find_if(s.chunks.begin(), s.chunks.end(), [&](const Chunk& c) { return c.base == base; });
}

}  // namespace

void* alloc(void*, size_t size) {
  State& s = state();
  if (!s.active || !poolable(size)) {
    void* p = plain_map(size);
    if (p) s.fallback_arenas++;
    return p;
  }
  const int slots = int(kChunk / size);
  for (Chunk& c : s.chunks) {
    if (c.slot_size != size) continue;
    for (int i = 0; i < slots; ++i) {
      if (!(c.used >> i & 1)) {
        c.used |= uint64_t(1) << i;
        return reinterpret_cast<void*>(c.base + uintptr_t(i) * size);
      }
    }
  }
  uintptr_t base = map_chunk();
  if (base == 0) return nullptr;
  s.chunks.push_back(Chunk{base, size, 1});
  return reinterpret_cast<void*>(base);
}

void free(void*, void* ptr, size_t size) {
  State& s = state();
  uintptr_t p = reinterpret_cast<uintptr_t>(ptr);
  auto it = find_chunk(s, p);
  if (it == s.chunks.end() || it->slot_size != size) {
    munmap(ptr, size);  // a plain arena (from before start(), after stop(), or an odd size)
    return;
  }
  it->used &= ~(uint64_t(1) << ((p - it->base) / size));
  if (it->used == 0) {
    munmap(reinterpret_cast<void*>(it->base), kChunk);  // also whatever free slots stayed mapped
    s.chunks.erase(it);
  } else if (s.active) {
    madvise(ptr, size, MADV_DONTNEED);  // keep the slot for the next arena, not its pages
  } else {
    munmap(ptr, size);  // as the plain allocator does
  }
}

void start() { state().active = true; }

size_t stop() {
  State& s = state();
  s.active = false;
  return s.chunks.size() * kChunk;
}

Stats stats() {
  const State& s = state();
  Stats out;
  out.chunks = s.chunks.size();
  for (const Chunk& c : s.chunks) out.arenas += size_t(__builtin_popcountll(c.used));
  out.fallback_arenas = s.fallback_arenas;
  out.active = s.active;
  return out;
}

}  // namespace cir::sandbox::arena_pool
