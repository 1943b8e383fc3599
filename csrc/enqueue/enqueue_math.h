// Ring-buffer arithmetic and row normalization of the queue update, shared by
// the CPU loop and the CUDA kernel (SEMANTICS.md §4).
#pragma once

#include <cmath>
#include <cstdint>

#include "common/sslfast_common.h"

namespace sslfast {
namespace enqueue {

// The slot the write starts at, from the stored pointer. Only the low 32 bits
// are read (the CUDA kernel uses the high 32 bits as its arrival counter); the
// op always leaves a value in [0, size) there.
SSLFAST_HD int64_t start_slot(uint64_t stored, int64_t size) {
  return static_cast<int64_t>(stored & 0xffffffffull) % size;
}

// Key row i of a batch lands where writing the rows one at a time would put it.
SSLFAST_HD int64_t ring_slot(int64_t start, int64_t i, int64_t size) { return (start + i) % size; }

// With more rows than slots only the newest `size` rows survive.
SSLFAST_HD int64_t first_kept_row(int64_t n, int64_t size) { return n > size ? n - size : 0; }

SSLFAST_HD int64_t next_ptr(int64_t start, int64_t n, int64_t size) {
  return (start + n % size) % size;
}

// F.normalize's divisor: max(||x||, 1e-12), from the sum of squares.
template <typename A>
SSLFAST_HD A row_divisor(A sum_of_squares) {
#ifdef __CUDA_ARCH__
  const A norm = sqrt(sum_of_squares);
#else
  const A norm = std::sqrt(sum_of_squares);
#endif
  const A eps = static_cast<A>(1e-12);
  return norm > eps ? norm : eps;
}

}  // namespace enqueue
}  // namespace sslfast
