#include "sandbox/mt19937.h"

namespace cir::sandbox::mt19937 {

void init_genrand(uint32_t* mt, uint32_t seed) {
  mt[0] = seed;
  for (int i = 1; i < kStateWords; ++i) mt[i] = 1812433253U * (mt[i - 1] ^ (mt[i - 1] >> 30)) + uint32_t(i);
}

void init_by_array(uint32_t* mt, const uint32_t* key, size_t key_length) {
  constexpr size_t n = kStateWords;
  init_genrand(mt, 19650218U);
  size_t i = 1, j = 0;
  for (size_t k = n > key_length ? n : key_length; k; --k) {
    mt[i] = (mt[i] ^ ((mt[i - 1] ^ (mt[i - 1] >> 30)) * 1664525U)) + key[j] + uint32_t(j);
    ++i;
    ++j;
    if (i >= n) {
      mt[0] = mt[n - 1];
      i = 1;
    }
    if (j >= key_length) j = 0;
  }
  for (size_t k = n - 1; k; --k) {
    mt[i] = (mt[i] ^ ((mt[i - 1] ^ (mt[i - 1] >> 30)) * 1566083941U)) - uint32_t(i);
    ++i;
    if (i >= n) {
      mt[0] = mt[n - 1];
      i = 1;
    }
  }
  mt[0] = 0x80000000U;  // non-zero initial state
}

}  // namespace cir::sandbox::mt19937
