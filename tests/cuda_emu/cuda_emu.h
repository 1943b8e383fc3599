// A CPU emulation of the part of CUDA that csrc/*/*_cuda.cu use, so that their
// kernels and launch code run, and are tested, on a machine without a GPU.
//
// tests/cuda_emu/__init__.py rewrites each .cu file to include this header instead
// of the CUDA ones (kernel launches become cuda_emu::Launch calls, __shared__
// variables per-block storage, the op registered as torch.ops.sslfast_emu.* for
// CPU tensors) and compiles it with the host compiler, with AddressSanitizer when
// the test process has it preloaded.
//
// Model: the blocks of a launch run one after another; the threads of a block run
// as fibers (ucontext) on one OS thread, each until it reaches a barrier
// (__syncthreads, a warp shuffle or __syncwarp) or returns; a barrier releases
// when every thread it concerns has reached it (a warp's at once: one warp may run
// ahead of another between two __syncthreads). What a GPU would reject or leave
// undefined is an error here: a __syncthreads that not every thread of the block
// reaches, a warp operation whose mask does not name the warp's threads, a block
// of more than 1024 threads, dynamic shared memory above 48 KiB without the
// opt-in attribute or above the device's limit, kernel parameters above 4 KiB.
// Shared memory holds 0xFF bytes (NaN floats, -1 integers) when a block starts,
// so reading it before writing it shows. The order of the blocks, and of the
// threads between barriers, can be shuffled (configure's seed): a result that
// depends on it is a race.
//
// Not modelled (a kernel relying on these can pass here and fail on a GPU): code
// between two barriers runs without interleaving (a non-atomic read-modify-write
// race within it never loses an update), blocks run in turn (no race across blocks, __threadfence is a no-op), host and device memory
// are one, static __shared__ does not count toward the shared memory limit,
// __launch_bounds__ and registers are ignored, __CUDA_ARCH__ branches and nvcc's
// floating-point contraction are not run. Refused rather than modelled: warp
// operations on part of a warp while the rest waits elsewhere, lanes of one warp
// at different warp operations, spin-waits (threads are never pre-empted: hangs).
// One op at a time: the state is process-wide.
#pragma once

#include <ATen/ATen.h>
#include <c10/core/Device.h>
#include <ucontext.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <deque>
#include <exception>
#include <functional>
#include <map>
#include <memory>
#include <numeric>
#include <random>
#include <sstream>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define CUDA_EMU_ASAN 1
#endif

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
using uint3 = dim3;
typedef struct CUstream_st* cudaStream_t;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };

inline uint3 threadIdx{0, 0, 0}, blockIdx{0, 0, 0};
inline dim3 blockDim, gridDim;

namespace cuda_emu {

constexpr int kWarpSize = 32;
constexpr size_t kStackBytes = size_t{64} << 10;
constexpr size_t kDefaultSmemBytes = size_t{48} << 10;  // without the opt-in attribute
constexpr size_t kParamBytes = 4096;                    // kernel parameters, all together

enum class Wait { Runnable, Block, Warp, Done };
enum class WarpOp { Sync, ShflXor, ShflDown, ShflUp, ShflIdx };

struct Fiber {
  ucontext_t ctx;
  std::unique_ptr<char[]> stack;
  Wait wait = Wait::Runnable;
  WarpOp op = WarpOp::Sync;
  int arg = 0, width = kWarpSize;
  unsigned mask = 0;
  uint64_t in = 0, out = 0;  // a shuffle's value, as bytes
  void* fake_stack = nullptr;
};

struct Runtime {
  // Set by configure().
  uint64_t seed = 0;                 // 0: blocks and threads in index order
  bool cpu_tensors_are_host = true;  // false: a CPU tensor counts as device memory
  bool stacks_dirty = true;          // fiber stacks to clean before the next block
  size_t optin_smem_bytes = size_t{227} << 10;  // sm_90
  // One launch.
  std::vector<Fiber> fibers;
  ucontext_t sched;
  int current = -1;
  const std::function<void()>* body = nullptr;
  std::exception_ptr error;
  void* sched_fake_stack = nullptr;
  const void* sched_stack_bottom = nullptr;
  size_t sched_stack_size = 0;
  std::unique_ptr<char[]> dynamic_smem;
  size_t dynamic_smem_bytes = 0;
  uint64_t block_epoch = 0;
  std::mt19937_64 rng;
  // Across launches.
  std::map<const void*, size_t> max_dynamic_smem;  // cudaFuncSetAttribute
  std::vector<std::string> launches;               // since the last launches() call
};

inline Runtime& rt() {
  static Runtime r;
  return r;
}

inline bool is_host(const at::Tensor& t) { return t.device().is_cpu() && rt().cpu_tensors_are_host; }

inline void fiber_entry() {
  Runtime& r = rt();
#ifdef CUDA_EMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &r.sched_stack_bottom, &r.sched_stack_size);
#endif
  try {
    (*r.body)();
  } catch (...) {
    if (!r.error) r.error = std::current_exception();
  }
  r.fibers[r.current].wait = Wait::Done;
#ifdef CUDA_EMU_ASAN
  __sanitizer_start_switch_fiber(nullptr, r.sched_stack_bottom, r.sched_stack_size);
#endif
}  // returns to uc_link: the scheduler

// From a thread: back to the scheduler until the barrier releases it.
inline void wait_at(Wait w) {
  Runtime& r = rt();
  Fiber& f = r.fibers[r.current];
  f.wait = w;
#ifdef CUDA_EMU_ASAN
  __sanitizer_start_switch_fiber(&f.fake_stack, r.sched_stack_bottom, r.sched_stack_size);
#endif
  swapcontext(&f.ctx, &r.sched);
#ifdef CUDA_EMU_ASAN
  __sanitizer_finish_switch_fiber(f.fake_stack, &r.sched_stack_bottom, &r.sched_stack_size);
#endif
}

inline void resume(int i) {
  Runtime& r = rt();
  Fiber& f = r.fibers[i];
  r.current = i;
  const unsigned n = static_cast<unsigned>(i);
  threadIdx = uint3{n % blockDim.x, n / blockDim.x % blockDim.y, n / (blockDim.x * blockDim.y)};
#ifdef CUDA_EMU_ASAN
  __sanitizer_start_switch_fiber(&r.sched_fake_stack, f.stack.get(), kStackBytes);
#endif
  swapcontext(&r.sched, &f.ctx);
#ifdef CUDA_EMU_ASAN
  __sanitizer_finish_switch_fiber(r.sched_fake_stack, nullptr, nullptr);
#endif
}

[[noreturn]] inline void fail(const std::string& what) {
  rt().stacks_dirty = true;  // the block's threads are abandoned where they wait
  std::ostringstream msg;
  msg << "cuda_emu: block (" << blockIdx.x << ", " << blockIdx.y << ", " << blockIdx.z
      << "): " << what;
  TORCH_CHECK(false, msg.str());
}

// Releases the warp starting at thread `first` if its threads that have not
// returned all wait at a warp operation; they join the back of `ready`.
inline bool release_warp(int first, int n_threads, std::deque<int>& ready) {
  Runtime& r = rt();
  const int last = std::min(first + kWarpSize, n_threads);
  unsigned live = 0;
  for (int i = first; i < last; ++i) {
    const Wait w = r.fibers[i].wait;
    if (w == Wait::Block || w == Wait::Runnable) return false;
    if (w == Wait::Warp) live |= 1u << (i - first);
  }
  if (live == 0) return false;
  for (int i = first; i < last; ++i) {
    const Fiber& f = r.fibers[i];
    if (f.wait != Wait::Warp) continue;
    if (f.mask != live)
      fail("warp operation with mask " + std::to_string(f.mask) + " but lanes " +
           std::to_string(live) + " are there");
    if (f.width != kWarpSize) fail("warp shuffles narrower than the warp are not emulated");
    const Fiber& lead = r.fibers[first + __builtin_ctz(live)];
    if (f.op != lead.op) fail("lanes of one warp at different warp operations");
  }
  for (int i = first; i < last; ++i) {
    Fiber& f = r.fibers[i];
    if (f.wait != Wait::Warp) continue;
    const int lane = i - first;
    int src = lane;
    switch (f.op) {
      case WarpOp::Sync: break;
      case WarpOp::ShflXor: src = lane ^ f.arg; break;
      case WarpOp::ShflDown: src = lane + f.arg; break;
      case WarpOp::ShflUp: src = lane - f.arg; break;
      case WarpOp::ShflIdx: src = static_cast<int>(static_cast<unsigned>(f.arg) % kWarpSize); break;
    }
    if (src < 0 || src >= kWarpSize) src = lane;  // out of the warp: the thread's own value
    if (!(live >> src & 1u)) fail("a shuffle reads lane " + std::to_string(src) + ", not in the mask");
    f.out = r.fibers[first + src].in;
  }
  for (int i = first; i < last; ++i) {
    if (r.fibers[i].wait != Wait::Warp) continue;
    r.fibers[i].wait = Wait::Runnable;
    ready.push_back(i);
  }
  return true;
}

inline void run_block(int n_threads) {
  Runtime& r = rt();
  if (static_cast<int>(r.fibers.size()) < n_threads) r.fibers.resize(n_threads);
  for (int i = 0; i < n_threads; ++i) {
    Fiber& f = r.fibers[i];
    if (!f.stack) f.stack.reset(new char[kStackBytes]);
#ifdef CUDA_EMU_ASAN
    // A thread left at a barrier by an error leaves its frames' redzones poisoned.
    if (r.stacks_dirty) ASAN_UNPOISON_MEMORY_REGION(f.stack.get(), kStackBytes);
#endif
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack.get();
    f.ctx.uc_stack.ss_size = kStackBytes;
    f.ctx.uc_link = &r.sched;
    makecontext(&f.ctx, fiber_entry, 0);
    // AddressSanitizer's swapcontext clears the poison of the stack a context names
    // at every switch, which would hide overflows of locals after a barrier; the
    // context keeps its stack pointer, the size is not needed past makecontext.
    f.ctx.uc_stack.ss_size = 0;
    f.wait = Wait::Runnable;
  }
  r.stacks_dirty = false;
  ++r.block_epoch;
  if (r.dynamic_smem_bytes) std::memset(r.dynamic_smem.get(), 0xFF, r.dynamic_smem_bytes);
  // Runnable threads: in order (seed 0) or picked at random. A warp goes on as soon
  // as its last thread reaches its warp operation, so warps progress independently
  // between two __syncthreads.
  std::deque<int> ready(n_threads);
  std::iota(ready.begin(), ready.end(), 0);
  for (;;) {
    while (!ready.empty()) {
      int i = ready.front();
      if (r.seed) {  // any runnable thread: take it out by swapping the front into its place
        const size_t k = static_cast<size_t>(r.rng() % ready.size());
        i = ready[k];
        ready[k] = ready.front();
      }
      ready.pop_front();
      resume(i);
      if (r.error) {
        r.stacks_dirty = true;
        std::rethrow_exception(std::exchange(r.error, nullptr));
      }
      if (r.fibers[i].wait == Wait::Warp) release_warp(i - i % kWarpSize, n_threads, ready);
    }
    int done = 0, at_block = 0;
    for (int i = 0; i < n_threads; ++i) {
      done += r.fibers[i].wait == Wait::Done;
      at_block += r.fibers[i].wait == Wait::Block;
    }
    if (done == n_threads) return;
    bool released = false;
    for (int w = 0; w < n_threads; w += kWarpSize) released |= release_warp(w, n_threads, ready);
    if (released) continue;
    if (at_block == n_threads) {
      for (int i = 0; i < n_threads; ++i) {
        r.fibers[i].wait = Wait::Runnable;
        ready.push_back(i);
      }
      continue;
    }
    if (at_block + done == n_threads)
      fail("__syncthreads reached by " + std::to_string(at_block) + " threads while " +
           std::to_string(done) + " returned");
    fail("deadlock: threads wait at different barriers");
  }
}

template <typename T>
inline T warp_op(WarpOp op, unsigned mask, T value, int arg, int width) {
  static_assert(sizeof(T) <= sizeof(uint64_t) && std::is_trivially_copyable_v<T>);
  Runtime& r = rt();
  Fiber& f = r.fibers[r.current];
  f.op = op;
  f.mask = mask;
  f.arg = arg;
  f.width = width;
  f.in = 0;
  std::memcpy(&f.in, &value, sizeof(T));
  wait_at(Wait::Warp);
  T out;
  std::memcpy(&out, &r.fibers[r.current].out, sizeof(T));
  return out;
}

// __shared__ T name: per-block storage, 0xFF bytes when each block starts.
template <typename T, int Id>
inline T& block_shared() {
  static_assert(std::is_trivially_destructible_v<T>);
  static std::unique_ptr<unsigned char[]> storage(new unsigned char[sizeof(T)]);
  static uint64_t epoch = 0;
  if (epoch != rt().block_epoch) {
    std::memset(storage.get(), 0xFF, sizeof(T));
    epoch = rt().block_epoch;
  }
  return *reinterpret_cast<T*>(storage.get());
}

// extern __shared__ T name[]: the launch's dynamic shared memory (its exact size:
// under AddressSanitizer a read past it is reported).
template <typename T>
inline T* dynamic_shared() {
  return reinterpret_cast<T*>(rt().dynamic_smem.get());
}

class Launch {
 public:
  Launch(const char* name, dim3 grid, dim3 block, size_t smem = 0, cudaStream_t = nullptr)
      : name_(name), grid_(grid), block_(block), smem_(smem) {}

  template <typename... P, typename... A>
  void operator()(void (*kernel)(P...), A&&... args) const {
    Runtime& r = rt();
    std::ostringstream rec;
    rec << name_ << " grid=(" << grid_.x << "," << grid_.y << "," << grid_.z << ") block=("
        << block_.x << "," << block_.y << "," << block_.z << ") smem=" << smem_;
    const std::string where = "launch of " + rec.str() + ": ";
    const uint64_t threads = uint64_t{block_.x} * block_.y * block_.z;
    TORCH_CHECK(threads >= 1 && threads <= 1024 && block_.z <= 64, "cuda_emu: ", where,
                "a block has 1 to 1024 threads (z at most 64)");
    TORCH_CHECK(grid_.x >= 1 && grid_.y >= 1 && grid_.z >= 1 && grid_.x <= 0x7FFFFFFFu &&
                    grid_.y <= 65535 && grid_.z <= 65535,
                "cuda_emu: ", where, "grid out of range");
    const auto attr = r.max_dynamic_smem.find(reinterpret_cast<const void*>(kernel));
    const size_t limit = attr == r.max_dynamic_smem.end() ? kDefaultSmemBytes : attr->second;
    TORCH_CHECK(smem_ <= limit, "cuda_emu: ", where, "dynamic shared memory above ", limit,
                " bytes (cudaFuncSetAttribute raises the 48 KiB default)");
    constexpr size_t param_bytes = (size_t{0} + ... + sizeof(P));
    static_assert(param_bytes <= kParamBytes, "kernel parameters above 4 KiB");
    r.launches.push_back(rec.str());
    // Arguments are converted to the parameter types and copied, as a launch does.
    const std::tuple<std::decay_t<P>...> params(std::forward<A>(args)...);
    const std::function<void()> body = [&] { std::apply(kernel, params); };
    r.body = &body;
    r.dynamic_smem.reset(new char[smem_]);  // none asked for: any access is past it
    r.dynamic_smem_bytes = smem_;
    blockDim = block_;
    gridDim = grid_;
    std::vector<uint64_t> blocks(uint64_t{grid_.x} * grid_.y * grid_.z);
    std::iota(blocks.begin(), blocks.end(), uint64_t{0});
    if (r.seed) std::shuffle(blocks.begin(), blocks.end(), r.rng);
    for (uint64_t b : blocks) {
      blockIdx = uint3{static_cast<unsigned>(b % grid_.x), static_cast<unsigned>(b / grid_.x % grid_.y),
                       static_cast<unsigned>(b / (uint64_t{grid_.x} * grid_.y))};
      run_block(static_cast<int>(threads));
    }
    r.body = nullptr;
  }

 private:
  const char* name_;
  dim3 grid_, block_;
  size_t smem_;
};

}  // namespace cuda_emu

inline void __syncthreads() { cuda_emu::wait_at(cuda_emu::Wait::Block); }
inline void __syncwarp(unsigned mask = 0xFFFFFFFFu) {
  cuda_emu::warp_op(cuda_emu::WarpOp::Sync, mask, 0, 0, cuda_emu::kWarpSize);
}
inline void __threadfence() {}
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = cuda_emu::kWarpSize) {
  return cuda_emu::warp_op(cuda_emu::WarpOp::ShflXor, mask, v, lane_mask, width);
}
template <typename T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = cuda_emu::kWarpSize) {
  return cuda_emu::warp_op(cuda_emu::WarpOp::ShflDown, mask, v, static_cast<int>(delta), width);
}
template <typename T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = cuda_emu::kWarpSize) {
  return cuda_emu::warp_op(cuda_emu::WarpOp::ShflUp, mask, v, static_cast<int>(delta), width);
}
template <typename T>
inline T __shfl_sync(unsigned mask, T v, int src, int width = cuda_emu::kWarpSize) {
  return cuda_emu::warp_op(cuda_emu::WarpOp::ShflIdx, mask, v, src, width);
}
// Atomics: a block runs between barriers without interruption, and blocks one after
// another, so plain read-modify-writes are atomic here.
template <typename T>
inline T atomicAdd(T* p, T v) {
  const T old = *p;
  *p = old + v;
  return old;
}
template <typename T>
inline T atomicExch(T* p, T v) {
  const T old = *p;
  *p = v;
  return old;
}
template <typename T>
inline T atomicMax(T* p, T v) {
  const T old = *p;
  *p = std::max(old, v);
  return old;
}
template <typename T>
inline T atomicCAS(T* p, T compare, T v) {
  const T old = *p;
  if (old == compare) *p = v;
  return old;
}

template <typename F>
inline cudaError_t cudaFuncSetAttribute(F* kernel, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 ||
      static_cast<size_t>(value) > cuda_emu::rt().optin_smem_bytes)
    return cudaErrorInvalidValue;
  cuda_emu::rt().max_dynamic_smem[reinterpret_cast<const void*>(kernel)] = static_cast<size_t>(value);
  return cudaSuccess;
}

// The c10 CUDA API the launch code uses: the current stream, the device guard.
namespace c10 {
namespace cuda {
struct CUDAStream {
  cudaStream_t stream() const { return nullptr; }
  operator cudaStream_t() const { return nullptr; }
};
inline CUDAStream getCurrentCUDAStream(c10::DeviceIndex = -1) { return {}; }
struct CUDAGuard {
  explicit CUDAGuard(c10::Device device) {
    TORCH_CHECK(device.is_cpu(), "cuda_emu: emulated kernels take CPU tensors, got ", device);
  }
};
}  // namespace cuda
}  // namespace c10
namespace at {
namespace cuda {
using c10::cuda::CUDAGuard;
using c10::cuda::CUDAStream;
using c10::cuda::getCurrentCUDAStream;
}  // namespace cuda
}  // namespace at

#define C10_CUDA_KERNEL_LAUNCH_CHECK() ((void)0)
#define C10_CUDA_CHECK(expr) \
  TORCH_CHECK((expr) == cudaSuccess, "cuda_emu: ", #expr, " failed")
