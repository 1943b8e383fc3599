// CPU enqueue_: rows copied (and optionally normalized) into their ring slots
// in parallel; the pointer is read once and advanced.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "enqueue/enqueue_checks.h"
#include "enqueue/enqueue_math.h"

namespace sslfast {
namespace enqueue {
namespace {

template <typename T>
void write_rows(T* queue, const T* keys, int64_t n, int64_t size, int64_t dim, int64_t start,
                bool normalize) {
  using A = acc_t<T>;
  const int64_t first = first_kept_row(n, size);
  const int64_t grain = std::max<int64_t>(1, (1 << 14) / std::max<int64_t>(dim, 1));
  at::parallel_for(first, n, grain, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      const T* src = keys + i * dim;
      T* dst = queue + ring_slot(start, i, size) * dim;
      if (!normalize) {
        std::copy(src, src + dim, dst);
        continue;
      }
      A sum = 0;
      for (int64_t j = 0; j < dim; ++j) sum += to_acc<A>(src[j]) * to_acc<A>(src[j]);
      const A divisor = row_divisor(sum);
      for (int64_t j = 0; j < dim; ++j) dst[j] = from_acc<T>(to_acc<A>(src[j]) / divisor);
    }
  });
}

void enqueue_cpu_(at::Tensor queue, at::Tensor ptr, const at::Tensor& keys_in, bool normalize) {
  check_args(queue, ptr, keys_in);
  const int64_t size = queue.size(0);
  const int64_t stored = ptr.reshape({}).item<int64_t>();
  TORCH_CHECK_VALUE(stored >= 0 && stored < size, "sslfast: enqueue_: ptr holds ", stored,
                    ", outside [0, ", size, ")");
  const int64_t n = keys_in.size(0);
  if (n == 0) return;
  const at::Tensor keys = keys_in.contiguous();
  const int64_t start = start_slot(static_cast<uint64_t>(stored), size);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, queue.scalar_type(), "enqueue_cpu_", [&] {
    write_rows<scalar_t>(queue.data_ptr<scalar_t>(), keys.data_ptr<scalar_t>(), n, size,
                         queue.size(1), start, normalize);
  });
  ptr.fill_(next_ptr(start, n, size));
}

}  // namespace

TORCH_LIBRARY_IMPL(sslfast, CPU, m) { m.impl("enqueue_", &enqueue_cpu_); }

}  // namespace enqueue
}  // namespace sslfast
