// Backing memory for the interpreter's small-object arenas in the zygote, laid out so that
// transparent huge pages can cover it.
//
// The interpreter gets each arena (1 MiB since Python 3.10) with its own mmap, so the
// kernel places them at 4 KiB-aligned addresses among other mappings, and collapsing the
// zygote's heap into 2 MiB pages (collapse_into_huge_pages) misses every arena that does not
// sit inside a 2 MiB-aligned range: about a third of the zygote's heap. This pool hands out
// arenas from 2 MiB-aligned chunks instead, while the zygote imports and warms up. Then
// stop() turns it back into plain mmap/munmap (what a fresh interpreter does), before the
// first snippet: children allocate their arenas exactly as `python -c` would.
//
// Plain C++ (no Python headers): the bindings register alloc/free with
// PyObject_SetArenaAllocator. Not thread-safe; the zygote is single-threaded.
#pragma once

#include <cstddef>
#include <cstdint>

namespace cir::sandbox::arena_pool {

// The interpreter's arena allocator interface: `ctx` is unused.
void* alloc(void* ctx, size_t size);
void free(void* ctx, void* ptr, size_t size);

// Starts serving arenas from aligned chunks (arenas already given out stay as they are).
void start();
// Back to plain mmap/munmap for every later arena. Chunks with no arena left are unmapped;
// free slots of the others stay mapped (zero pages, so a chunk collapses into one huge
// page). Returns the bytes still held in chunks.
size_t stop();

struct Stats {
  size_t chunks = 0;          // 2 MiB chunks mapped
  size_t arenas = 0;          // arenas currently given out from chunks
  size_t fallback_arenas = 0; // arenas served by plain mmap (pool stopped, or an odd size)
  bool active = false;
};
Stats stats();

}  // namespace cir::sandbox::arena_pool
