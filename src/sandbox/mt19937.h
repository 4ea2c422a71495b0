// MT19937 seeding, exactly as the interpreter's `random` module and numpy's legacy global
// generator seed their Mersenne Twister, so that a forked snippet process can be given fresh
// seeds by writing the generators' state directly (see cir.sandbox.zygote, native fork).
#pragma once

#include <cstddef>
#include <cstdint>

namespace cir::sandbox::mt19937 {

constexpr int kStateWords = 624;

// The reference init_genrand: state from one 32-bit seed (numpy.random.seed(int)).
void init_genrand(uint32_t* mt, uint32_t seed);
// The reference init_by_array (random.seed() from OS entropy, random.seed(int)).
void init_by_array(uint32_t* mt, const uint32_t* key, size_t key_length);

}  // namespace cir::sandbox::mt19937
