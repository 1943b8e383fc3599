// CUDA EMA: a multi-tensor-apply kernel. Every tensor is cut into chunks of
// kChunk elements; one block updates one chunk; the (tensor, chunk) table of a
// launch travels in the kernel's parameters, so hundreds of tensors take a few
// launches and no host-to-device copy. decay may live on the device (no sync).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "ema/ema_math.h"
#include "ema/ema_plan.h"

namespace sslfast {
namespace ema {
namespace {

constexpr int kChunk = 1 << 16;   // elements per block
constexpr int kThreads = 512;
constexpr int kMaxTensors = 64;   // per launch; the table stays under 4 KiB
constexpr int kMaxBlocks = 320;

struct LaunchTable {
  void* target[kMaxTensors];
  const void* source[kMaxTensors];
  int64_t numel[kMaxTensors];
  uint8_t block_tensor[kMaxBlocks];
  int32_t block_chunk[kMaxBlocks];
};

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <typename T, typename S>
__global__ void __launch_bounds__(kThreads)
    _ema_fwd_kernel(const LaunchTable table, const double* __restrict__ decay_ptr, double w_host) {
  using A = acc_t<T>;
  constexpr int kVec = 16 / sizeof(T) < 8 ? 16 / sizeof(T) : 8;  // 4 fp32, 8 bf16/fp16, 2 fp64
  const int tensor = table.block_tensor[blockIdx.x];
  const int64_t start = static_cast<int64_t>(table.block_chunk[blockIdx.x]) * kChunk;
  const int64_t rest = table.numel[tensor] - start;
  const int64_t len = rest < kChunk ? rest : kChunk;
  // Not __restrict__: a target may be its own source (each element is read, then
  // written, by one thread).
  T* t = static_cast<T*>(table.target[tensor]) + start;
  const S* s = static_cast<const S*>(table.source[tensor]) + start;
  const A w = static_cast<A>(decay_ptr ? 1.0 - *decay_ptr : w_host);

  const bool aligned = (reinterpret_cast<uintptr_t>(t) % sizeof(Pack<T, kVec>) == 0) &&
                       (reinterpret_cast<uintptr_t>(s) % sizeof(Pack<S, kVec>) == 0);
  int64_t done = 0;
  if (aligned) {
    const int64_t packs = len / kVec;
    auto* tp = reinterpret_cast<Pack<T, kVec>*>(t);
    const auto* sp = reinterpret_cast<const Pack<S, kVec>*>(s);
    for (int64_t p = threadIdx.x; p < packs; p += blockDim.x) {
      Pack<T, kVec> tv = tp[p];
      const Pack<S, kVec> sv = sp[p];
#pragma unroll
      for (int k = 0; k < kVec; ++k) tv.v[k] = update<T, S>(tv.v[k], sv.v[k], w);
      tp[p] = tv;
    }
    done = packs * kVec;
  }
  for (int64_t i = done + threadIdx.x; i < len; i += blockDim.x) t[i] = update<T, S>(t[i], s[i], w);
}

struct LaunchGroup {
  const std::vector<const Region*>& regions;
  const double* decay_ptr;
  double w_host;
  cudaStream_t stream;

  template <typename T, typename S>
  void operator()() const {
    LaunchTable table;
    int n_tensors = 0, n_blocks = 0;
    auto launch = [&]() {
      if (n_blocks == 0) return;
      _ema_fwd_kernel<T, S><<<n_blocks, kThreads, 0, stream>>>(table, decay_ptr, w_host);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    for (const Region* r : regions) {
      const int64_t chunks = (r->numel + kChunk - 1) / kChunk;
      for (int64_t c = 0; c < chunks; ++c) {
        if (c == 0) {  // a new tensor entry
          table.target[n_tensors] = r->target;
          table.source[n_tensors] = r->source;
          table.numel[n_tensors] = r->numel;
          ++n_tensors;
        }
        table.block_tensor[n_blocks] = static_cast<uint8_t>(n_tensors - 1);
        table.block_chunk[n_blocks] = static_cast<int32_t>(c);
        ++n_blocks;
        const bool last_chunk = c + 1 == chunks;
        if (n_blocks == kMaxBlocks || (last_chunk && n_tensors == kMaxTensors)) {
          launch();
          n_blocks = 0;
          // A tensor cut between launches is carried over as the first entry.
          if (!last_chunk) {
            table.target[0] = r->target;
            table.source[0] = r->source;
            table.numel[0] = r->numel;
            n_tensors = 1;
          } else {
            n_tensors = 0;
          }
        }
      }
    }
    launch();
  }
};

void ema_cuda_(at::TensorList targets, at::TensorList sources,
               const c10::optional<at::Tensor>& decay_tensor, double decay) {
  if (targets.empty()) {
    TORCH_CHECK_VALUE(sources.empty(), "sslfast: targets has 0 tensors but sources has ",
                      sources.size());
    return;
  }
  // The dispatcher picks this kernel when any argument is on a GPU: a mix of devices is
  // reported by the checks (make_plan's, the decay's), not by the guard's assertion.
  Plan plan = make_plan(targets, sources);
  TORCH_CHECK_VALUE(targets[0].is_cuda(), "sslfast: decay is on ",
                    decay_tensor.has_value() ? decay_tensor->device() : targets[0].device(),
                    " but targets are on ", targets[0].device());
  const c10::cuda::CUDAGuard guard(targets[0].device());
  at::Tensor decay_dev;
  const double* decay_ptr = nullptr;
  if (decay_tensor.has_value()) {
    const at::Tensor& d = *decay_tensor;
    TORCH_CHECK_VALUE(d.dim() == 0 && d.is_floating_point(),
                      "sslfast: decay must be a 0-dim floating-point tensor");
    if (d.device().is_cpu()) {
      decay = d.item<double>();  // host memory: no device sync
    } else {
      TORCH_CHECK_VALUE(d.device() == targets[0].device(), "sslfast: decay is on ", d.device(),
                        " but targets are on ", targets[0].device());
      decay_dev = d.to(at::kDouble);  // asynchronous; the kernel reads it
      decay_ptr = decay_dev.data_ptr<double>();
    }
  }
  if (decay_ptr == nullptr) check_decay_value(decay);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();

  // One pass of launches per dtype pair.
  for (int p = 0; p < static_cast<int>(DtypePair::Unsupported); ++p) {
    std::vector<const Region*> group;
    for (const Region& r : plan.regions)
      if (static_cast<int>(r.pair) == p) group.push_back(&r);
    if (group.empty()) continue;
    dispatch_dtype_pair(static_cast<DtypePair>(p), LaunchGroup{group, decay_ptr, 1.0 - decay, stream});
  }
  finish_plan(plan);
}

}  // namespace

TORCH_LIBRARY_IMPL(sslfast, CUDA, m) { m.impl("ema_", &ema_cuda_); }

}  // namespace ema
}  // namespace sslfast
