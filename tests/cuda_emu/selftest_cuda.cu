// Kernels for tests/test_cuda_emu.py, built into the emulator's library beside the
// rewritten csrc kernels: a correct one the emulator must run exactly, and one of
// each defect it must report (a race on shared memory, a __syncthreads that not
// every thread reaches, shared memory beyond the limit, a read past a tensor or a
// local array).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

namespace {

constexpr int kThreads = 128;

// Sum of x per block: a tree in shared memory down to one warp, then shuffles.
__global__ void _sum_kernel(const float* x, int64_t n, float* out) {
  __shared__ float part[kThreads];
  float s = 0.f;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * kThreads)
    s += x[i];
  part[threadIdx.x] = s;
  __syncthreads();
  for (int w = kThreads / 2; w >= 32; w /= 2) {
    if (threadIdx.x < w) part[threadIdx.x] += part[threadIdx.x + w];
    __syncthreads();
  }
  if (threadIdx.x < 32) {
    float v = part[threadIdx.x];
    for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
    if (threadIdx.x == 0) out[blockIdx.x] = v;
  }
}

// Each thread stores its element, then loads its neighbour's: a race without the barrier.
__global__ void _neighbour_kernel(const float* x, bool sync, float* out) {
  __shared__ float slot[kThreads];
  slot[threadIdx.x] = x[threadIdx.x];
  if (sync) __syncthreads();
  out[threadIdx.x] = slot[(threadIdx.x + 1) % kThreads];
}

// Two warps, no __syncthreads: each shuffles, then warp 0 reads what thread 32
// stores: 42 when warp 1 got there first, else the fill (NaN).
__global__ void _warp_ahead_kernel(float* out) {
  __shared__ float stored;
  const float one = __shfl_xor_sync(0xffffffffu, 1.f, 1);
  if (threadIdx.x == 32) stored = 42.f * one;
  if (threadIdx.x < 32) out[threadIdx.x] = stored;
}

__global__ void _early_return_kernel(int64_t n_return, float* out) {
  if (threadIdx.x < n_return) return;
  __syncthreads();
  out[threadIdx.x] = 1.f;
}

__global__ void _dynamic_smem_kernel(int64_t n, float* out) {
  extern __shared__ float buffer[];
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) buffer[i] = static_cast<float>(i);
  __syncthreads();
  if (threadIdx.x == 0) {
    float s = 0.f;
    for (int64_t i = 0; i < n; ++i) s += buffer[i];
    out[0] = s;
  }
}

// One warp: out[lane] = the value (the lane) that shuffle `mode` gives it.
__global__ void _shuffle_kernel(int64_t mode, int arg, float* out) {
  const float v = static_cast<float>(threadIdx.x);
  float r = v;
  if (mode == 0) r = __shfl_xor_sync(0xffffffffu, v, arg);
  if (mode == 1) r = __shfl_down_sync(0xffffffffu, v, static_cast<unsigned>(arg));
  if (mode == 2) r = __shfl_up_sync(0xffffffffu, v, static_cast<unsigned>(arg));
  if (mode == 3) r = __shfl_sync(0xffffffffu, v, arg);
  out[threadIdx.x] = r;
}

// Each thread of a 3-D grid of 3-D blocks writes its flat index at its flat index.
__global__ void _index_kernel(int64_t* out) {
  const int64_t block = (static_cast<int64_t>(blockIdx.z) * gridDim.y + blockIdx.y) * gridDim.x +
                        blockIdx.x;
  const int64_t thread = (static_cast<int64_t>(threadIdx.z) * blockDim.y + threadIdx.y) *
                             blockDim.x + threadIdx.x;
  const int64_t i = block * blockDim.x * blockDim.y * blockDim.z + thread;
  out[i] = i;
}

// Writes local[n] after a barrier: past a local array when n >= 4.
__global__ void _stack_past_kernel(int64_t n, float* out) {
  volatile float local[4] = {0.f, 0.f, 0.f, 0.f};
  __syncthreads();
  local[n] = 1.f;
  if (threadIdx.x == 0) out[0] = local[0];
}

// Reads x[n]: one element past the tensor.
__global__ void _read_past_kernel(const float* x, int64_t n, float* out) {
  if (threadIdx.x == 0) out[0] = x[n];
}

at::Tensor sum(const at::Tensor& x) {
  const at::Tensor xc = x.contiguous();
  const int blocks = 3;
  at::Tensor out = at::empty({blocks}, x.options());
  _sum_kernel<<<blocks, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      xc.data_ptr<float>(), xc.numel(), out.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out.sum();
}

at::Tensor neighbour(const at::Tensor& x, bool sync) {
  TORCH_CHECK(x.numel() == kThreads && x.is_contiguous());
  at::Tensor out = at::empty_like(x);
  _neighbour_kernel<<<1, kThreads>>>(x.data_ptr<float>(), sync, out.data_ptr<float>());
  return out;
}

at::Tensor warp_ahead(const at::Tensor& like) {
  at::Tensor out = at::empty({32}, like.options());
  _warp_ahead_kernel<<<1, 64>>>(out.data_ptr<float>());
  return out;
}

at::Tensor early_return(const at::Tensor& like, int64_t n_return) {
  at::Tensor out = at::zeros({kThreads}, like.options());
  _early_return_kernel<<<1, kThreads>>>(n_return, out.data_ptr<float>());
  return out;
}

at::Tensor dynamic_smem(const at::Tensor& like, int64_t n, bool opt_in) {
  at::Tensor out = at::empty({1}, like.options());
  const size_t bytes = sizeof(float) * n;
  if (opt_in)
    C10_CUDA_CHECK(cudaFuncSetAttribute(_dynamic_smem_kernel,
                                        cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(bytes)));
  _dynamic_smem_kernel<<<1, kThreads, bytes>>>(n, out.data_ptr<float>());
  return out;
}

at::Tensor shuffle(const at::Tensor& like, int64_t mode, int64_t arg) {
  at::Tensor out = at::empty({32}, like.options());
  _shuffle_kernel<<<1, 32>>>(mode, static_cast<int>(arg), out.data_ptr<float>());
  return out;
}

at::Tensor flat_index(const at::Tensor& like) {
  const dim3 grid(3, 2, 2), block(4, 2, 3);
  at::Tensor out = at::full({3 * 2 * 2 * 4 * 2 * 3}, -1, like.options().dtype(at::kLong));
  _index_kernel<<<grid, block>>>(out.data_ptr<int64_t>());
  return out;
}

at::Tensor stack_past(const at::Tensor& like, int64_t n) {
  at::Tensor out = at::empty({1}, like.options());
  _stack_past_kernel<<<1, 32>>>(n, out.data_ptr<float>());
  return out;
}

at::Tensor read_past(const at::Tensor& x) {
  at::Tensor out = at::empty({1}, x.options());
  _read_past_kernel<<<1, 32>>>(x.data_ptr<float>(), x.numel(), out.data_ptr<float>());
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sslfast_emu, m) {
  m.def("_selftest_sum(Tensor x) -> Tensor");
  m.def("_selftest_neighbour(Tensor x, bool sync) -> Tensor");
  m.def("_selftest_warp_ahead(Tensor like) -> Tensor");
  m.def("_selftest_early_return(Tensor like, int n_return) -> Tensor");
  m.def("_selftest_dynamic_smem(Tensor like, int n, bool opt_in) -> Tensor");
  m.def("_selftest_shuffle(Tensor like, int mode, int arg) -> Tensor");
  m.def("_selftest_index(Tensor like) -> Tensor");
  m.def("_selftest_stack_past(Tensor like, int n) -> Tensor");
  m.def("_selftest_read_past(Tensor x) -> Tensor");
}

TORCH_LIBRARY_IMPL(sslfast_emu, CPU, m) {
  m.impl("_selftest_sum", &sum);
  m.impl("_selftest_neighbour", &neighbour);
  m.impl("_selftest_warp_ahead", &warp_ahead);
  m.impl("_selftest_early_return", &early_return);
  m.impl("_selftest_dynamic_smem", &dynamic_smem);
  m.impl("_selftest_shuffle", &shuffle);
  m.impl("_selftest_index", &flat_index);
  m.impl("_selftest_stack_past", &stack_past);
  m.impl("_selftest_read_past", &read_past);
}
