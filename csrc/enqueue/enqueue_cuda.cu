// CUDA enqueue_: one kernel, no host synchronization. Each block reads the
// device-side pointer with an atomic add on its high 32 bits (an arrival
// counter); the block that arrives last, when every block has read the start
// slot, stores the advanced pointer, which clears the counter. Each warp then
// writes whole rows, normalizing them on the way when asked.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "enqueue/enqueue_checks.h"
#include "enqueue/enqueue_math.h"

namespace sslfast {
namespace enqueue {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxBlocks = 1024;

template <typename T>
__global__ void __launch_bounds__(kThreads)
    _enqueue_fwd_kernel(T* __restrict__ queue, unsigned long long* __restrict__ ptr,
                        const T* __restrict__ keys, int64_t n, int64_t size, int64_t dim,
                        bool normalize) {
  using A = acc_t<T>;
  __shared__ int64_t start_shared;
  if (threadIdx.x == 0) {
    const unsigned long long old = atomicAdd(ptr, 1ull << 32);
    const int64_t start = start_slot(old, size);
    start_shared = start;
    if ((old >> 32) == gridDim.x - 1)  // the last block to read the pointer
      atomicExch(ptr, static_cast<unsigned long long>(next_ptr(start, n, size)));
  }
  __syncthreads();
  const int64_t start = start_shared;
  const int lane = threadIdx.x % 32;
  const int64_t warp = blockIdx.x * kWarps + threadIdx.x / 32;
  const int64_t n_warps = static_cast<int64_t>(gridDim.x) * kWarps;
  for (int64_t i = first_kept_row(n, size) + warp; i < n; i += n_warps) {
    const T* src = keys + i * dim;
    T* dst = queue + ring_slot(start, i, size) * dim;
    if (!normalize) {
      for (int64_t j = lane; j < dim; j += 32) dst[j] = src[j];
      continue;
    }
    A sum = 0;
    for (int64_t j = lane; j < dim; j += 32) {
      const A v = to_acc<A>(src[j]);
      sum += v * v;
    }
    for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
    const A divisor = row_divisor(sum);
    for (int64_t j = lane; j < dim; j += 32) dst[j] = from_acc<T>(to_acc<A>(src[j]) / divisor);
  }
}

void enqueue_cuda_(at::Tensor queue, at::Tensor ptr, const at::Tensor& keys_in, bool normalize) {
  check_args(queue, ptr, keys_in);
  const int64_t n = keys_in.size(0);
  if (n == 0) return;
  const at::cuda::CUDAGuard guard(queue.device());
  const at::Tensor keys = keys_in.contiguous();
  const int64_t size = queue.size(0);
  const int64_t rows = std::min(n, size);
  const int blocks = static_cast<int>(std::min<int64_t>((rows + kWarps - 1) / kWarps, kMaxBlocks));
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, queue.scalar_type(), "enqueue_cuda_", [&] {
    _enqueue_fwd_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
        queue.data_ptr<scalar_t>(), reinterpret_cast<unsigned long long*>(ptr.data_ptr<int64_t>()),
        keys.data_ptr<scalar_t>(), n, size, queue.size(1), normalize);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

TORCH_LIBRARY_IMPL(sslfast, CUDA, m) { m.impl("enqueue_", &enqueue_cuda_); }

}  // namespace enqueue
}  // namespace sslfast
