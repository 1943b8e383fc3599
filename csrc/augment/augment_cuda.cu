// CUDA augmentation: the per-pixel chain (crop + antialiased resize straight from
// the uint8 source, flip, jitter in the sample's order, grayscale) is evaluated
// where it is needed, with the math of augment_math.h:
//   1. _augment_mean_kernel: only for samples whose contrast runs: each block
//      evaluates the chain up to contrast over one output tile and writes the
//      tile's sum of gray values (a deterministic, atomic-free partial).
//   2. _augment_fwd_kernel: one block per (output tile, sample). Without blur each
//      thread evaluates its pixels and writes them (solarize, normalize). With
//      blur the block evaluates the tile and its halo (reflect-mapped) into shared
//      memory, blurs rows into a second shared buffer, then columns, and writes:
//      one write per output element.
//   3. Blur kernels larger than kMaxTaps (their haloed tile would not fit shared
//      memory): _augment_fwd_kernel writes the blurred samples' chain to a float
//      buffer, _augment_taps_kernel makes each sample's taps, and
//      _augment_blur_pass_kernel blurs rows into a second buffer, then columns
//      (solarize, normalize, one write per output element), reading neighbours
//      from global memory.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstring>
#include <limits>
#include <vector>

#include "augment/augment_checks.h"
#include "augment/augment_math.h"

namespace sslfast {
namespace augment {
namespace {

constexpr int kTile = 32;     // output tile edge
constexpr int kThreads = 256;
// Blur kernel sizes up to this take the haloed tile in shared memory, which then
// fits that of every sm_80+ GPU (99 KB on sm_86/sm_89); larger ones two passes
// over global memory.
constexpr int kMaxTaps = 45;

struct ImageRef {
  const void* data;
  int64_t height, width, stride_c, stride_h, stride_w;
  int32_t is_uint8;
};

struct Normalize {
  float mean[3], stdv[3];
};

template <typename O>
struct Output {
  O* data;  // the (B, 3, S, S) output; element (b, c, y, x) at b*sb + c*sc + y*sh + x*sw
  int64_t sb, sc, sh, sw;
};

struct Sample {
  const ImageRef* images;
  const int64_t* boxes;    // (B, 4) top, left, height, width
  const uint8_t* flags;    // (B, 4) flip, jitter, gray, solarize
  const float* factors;    // (B, 5) brightness, contrast, saturation, hue, sigma
  const int64_t* order;    // (B, 4)
  int64_t size;
};

// Coordinates are clamped into the image: a crop box outside it (possible only
// with hand-made parameters: the sampler's boxes are inside, and CPU-resident
// boxes are checked) reads edge pixels instead of memory beyond the image.
__device__ __forceinline__ float load_pixel(const ImageRef& im, int64_t c, int64_t y, int64_t x) {
  y = y < 0 ? 0 : (y >= im.height ? im.height - 1 : y);
  x = x < 0 ? 0 : (x >= im.width ? im.width - 1 : x);
  const int64_t off = c * im.stride_c + y * im.stride_h + x * im.stride_w;
  if (im.is_uint8) return static_cast<float>(static_cast<const uint8_t*>(im.data)[off]) / 255.f;
  return static_cast<const float*>(im.data)[off];
}

// The resized, flipped crop at output (y, x), as augment_cpu.cpp computes it:
// for each source row of y's window the horizontal weighted sum, then the
// vertical weighted sum of those. Each channel's sums run in the CPU's order;
// the loop over columns is outside the one over channels, so that each weight
// is computed once per row rather than once per channel.
__device__ __forceinline__ void resized_pixel(const Sample& s, int64_t b, int64_t y, int64_t x,
                                              float* rgb) {
  const ImageRef& im = s.images[b];
  const int64_t* box = s.boxes + 4 * b;
  const int64_t S = s.size;
  const int64_t xs = s.flags[4 * b] ? S - 1 - x : x;
  const AAWindow wy = aa_window(y, box[2], S), wx = aa_window(xs, box[3], S);
  float ty = 0.f, tx = 0.f;
  for (int64_t j = 0; j < wy.xsize; ++j) ty += aa_weight(wy, j);
  for (int64_t j = 0; j < wx.xsize; ++j) tx += aa_weight(wx, j);
  for (int c = 0; c < 3; ++c) rgb[c] = 0.f;
  for (int64_t jy = 0; jy < wy.xsize; ++jy) {
    const float wyj = ty != 0.f ? aa_weight(wy, jy) / ty : 0.f;
    const int64_t sy = box[0] + wy.xmin + jy;
    float acc[3] = {0.f, 0.f, 0.f};
    for (int64_t jx = 0; jx < wx.xsize; ++jx) {
      const float wxj = tx != 0.f ? aa_weight(wx, jx) / tx : 0.f;
      const int64_t sx = box[1] + wx.xmin + jx;
      for (int c = 0; c < 3; ++c) acc[c] += wxj * load_pixel(im, c, sy, sx);
    }
    for (int c = 0; c < 3; ++c) rgb[c] += wyj * acc[c];
  }
}

// The chain at (y, x): resize, flip, the jitter ops in order (stop_at_contrast:
// up to contrast, exclusive), grayscale (unless stopped). mean: the gray mean at
// contrast's turn.
__device__ __forceinline__ void chain_pixel(const Sample& s, int64_t b, int64_t y, int64_t x,
                                            float mean, bool stop_at_contrast, float* rgb) {
  resized_pixel(s, b, y, x, rgb);
  const uint8_t* f = s.flags + 4 * b;
  const float* fac = s.factors + 5 * b;
  if (f[1]) {
    for (int k = 0; k < 4; ++k) {
      const int64_t op = s.order[4 * b + k];
      if (op < 0 || op > 3) continue;  // not a jitter op (the sampler never makes one)
      if (op == 1 && stop_at_contrast) return;
      if (op == 3 ? fac[3] == 0.f : fac[op] == 1.f) continue;  // neutral: skipped
      if (op == 0) {
        for (int c = 0; c < 3; ++c) rgb[c] = blend(rgb[c], 0.f, fac[0]);
      } else if (op == 1) {
        for (int c = 0; c < 3; ++c) rgb[c] = blend(rgb[c], mean, fac[1]);
      } else if (op == 2) {
        const float l = gray(rgb[0], rgb[1], rgb[2]);
        for (int c = 0; c < 3; ++c) rgb[c] = blend(rgb[c], l, fac[2]);
      } else {
        adjust_hue(rgb[0], rgb[1], rgb[2], fac[3]);
      }
    }
  }
  if (stop_at_contrast) return;
  if (f[2]) rgb[0] = rgb[1] = rgb[2] = gray(rgb[0], rgb[1], rgb[2]);
}

__device__ __forceinline__ bool needs_mean(const Sample& s, int64_t b) {
  return s.flags[4 * b + 1] && s.factors[5 * b + 1] != 1.f;
}

__global__ void __launch_bounds__(kThreads)
    _augment_mean_kernel(Sample s, int64_t tiles_x, int64_t n_tiles, float* partial) {
  const int64_t b = blockIdx.x / n_tiles, tile = blockIdx.x % n_tiles;
  if (!needs_mean(s, b)) return;
  const int64_t S = s.size;
  const int64_t y0 = (tile / tiles_x) * kTile, x0 = (tile % tiles_x) * kTile;
  float sum = 0.f;
  for (int i = threadIdx.x; i < kTile * kTile; i += blockDim.x) {
    const int64_t y = y0 + i / kTile, x = x0 + i % kTile;
    if (y >= S || x >= S) continue;
    float rgb[3];
    chain_pixel(s, b, y, x, 0.f, true, rgb);
    sum += gray(rgb[0], rgb[1], rgb[2]);
  }
  __shared__ float red[kThreads];
  red[threadIdx.x] = sum;
  __syncthreads();
  for (int w = kThreads / 2; w > 0; w /= 2) {  // fixed order: deterministic
    if (threadIdx.x < w) red[threadIdx.x] += red[threadIdx.x + w];
    __syncthreads();
  }
  if (threadIdx.x == 0) partial[b * n_tiles + tile] = red[0];
}

template <typename O>
__device__ __forceinline__ void store(const Output<O>& out, int64_t b, int64_t y, int64_t x,
                                      const float* rgb, bool solar, const Normalize& norm) {
  O* o = out.data + b * out.sb + y * out.sh + x * out.sw;
  for (int c = 0; c < 3; ++c) {
    const float p = solar ? solarize(rgb[c]) : rgb[c];
    o[c * out.sc] = static_cast<O>((p - norm.mean[c]) / norm.stdv[c]);
  }
}

// Normalized Gaussian taps, summed and divided in one fixed order (both blur paths
// make the same bits).
__device__ __forceinline__ void make_taps(float* taps, int64_t kernel_size, float sigma) {
  float total = 0.f;
  for (int64_t k = 0; k < kernel_size; ++k) total += (taps[k] = gaussian_tap(k, kernel_size, sigma));
  for (int64_t k = 0; k < kernel_size; ++k) taps[k] /= total;
}

// The gray mean at contrast's turn, from the pre-pass's partials summed in a fixed order.
__device__ __forceinline__ float contrast_mean(const Sample& s, int64_t b, int64_t n_tiles,
                                               const float* partial) {
  if (!needs_mean(s, b)) return 0.f;
  double total = 0.0;
  for (int64_t t = 0; t < n_tiles; ++t) total += partial[b * n_tiles + t];
  return static_cast<float>(total / static_cast<double>(s.size * s.size));
}

// pre: null, or (blur kernels above kMaxTaps) the (B, 3, S, S) buffer that takes
// the blurred samples' unblurred chain for _augment_blur_pass_kernel.
template <typename O>
__global__ void __launch_bounds__(kThreads)
    _augment_fwd_kernel(Sample s, int64_t tiles_x, int64_t n_tiles, const float* partial,
                        int64_t kernel_size, Normalize norm, Output<O> out, float* pre) {
  extern __shared__ float smem[];
  const int64_t b = blockIdx.x / n_tiles, tile = blockIdx.x % n_tiles;
  const int64_t S = s.size;
  const int64_t y0 = (tile / tiles_x) * kTile, x0 = (tile % tiles_x) * kTile;
  const bool solar = s.flags[4 * b + 3];
  const float mean = contrast_mean(s, b, n_tiles, partial);
  const float sigma = s.factors[5 * b + 4];
  const bool blurred = sigma > 0.f;
  if (!blurred || pre != nullptr) {
    for (int i = threadIdx.x; i < kTile * kTile; i += blockDim.x) {
      const int64_t y = y0 + i / kTile, x = x0 + i % kTile;
      if (y >= S || x >= S) continue;
      float rgb[3];
      chain_pixel(s, b, y, x, mean, false, rgb);
      if (!blurred) {
        store(out, b, y, x, rgb, solar, norm);
      } else {
        for (int c = 0; c < 3; ++c) pre[((b * 3 + c) * S + y) * S + x] = rgb[c];
      }
    }
    return;
  }
  // Blur: the tile and its halo, reflect-mapped, in shared memory.
  const int64_t pad = kernel_size / 2;
  const int64_t E = kTile + 2 * pad;  // haloed edge
  float* halo = smem;                  // (3, E, E)
  float* rows = smem + 3 * E * E;      // (3, E, kTile): rows blurred
  float* taps = rows + 3 * E * kTile;  // (kernel_size)
  if (threadIdx.x == 0) make_taps(taps, kernel_size, sigma);
  for (int64_t i = threadIdx.x; i < E * E; i += blockDim.x) {
    const int64_t hy = i / E, hx = i % E;
    const int64_t y = reflect(y0 + hy - pad, S), x = reflect(x0 + hx - pad, S);
    float rgb[3] = {0.f, 0.f, 0.f};
    if (y0 + hy - pad < S + pad && x0 + hx - pad < S + pad)  // beyond: never read
      chain_pixel(s, b, y < S ? y : S - 1, x < S ? x : S - 1, mean, false, rgb);
    for (int c = 0; c < 3; ++c) halo[(c * E + hy) * E + hx] = rgb[c];
  }
  __syncthreads();
  for (int64_t i = threadIdx.x; i < E * kTile; i += blockDim.x) {  // horizontal
    const int64_t hy = i / kTile, tx = i % kTile;
    for (int c = 0; c < 3; ++c) {
      const float* r = halo + (c * E + hy) * E + tx;
      float acc = 0.f;
      for (int64_t k = 0; k < kernel_size; ++k) acc += taps[k] * r[k];
      rows[(c * E + hy) * kTile + tx] = acc;
    }
  }
  __syncthreads();
  for (int i = threadIdx.x; i < kTile * kTile; i += blockDim.x) {  // vertical, write
    const int64_t ty = i / kTile, tx = i % kTile;
    const int64_t y = y0 + ty, x = x0 + tx;
    if (y >= S || x >= S) continue;
    float rgb[3];
    for (int c = 0; c < 3; ++c) {
      float acc = 0.f;
      for (int64_t k = 0; k < kernel_size; ++k) acc += taps[k] * rows[(c * E + ty + k) * kTile + tx];
      rgb[c] = acc;
    }
    store(out, b, y, x, rgb, solar, norm);
  }
}

__global__ void _augment_taps_kernel(const float* factors, int64_t batch, int64_t kernel_size,
                                     float* taps) {
  const int64_t b = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (b < batch && factors[5 * b + 4] > 0.f)
    make_taps(taps + b * kernel_size, kernel_size, factors[5 * b + 4]);
}

// One direction of the blur for the blurred samples, one block per (output tile,
// sample), reflect padding as the haloed path: rows (kFinal false) from `src` into
// `mid`; then columns (kFinal true) from `src` (the rows pass's output), solarized,
// normalized and written to the output. Taps accumulate in the CPU's order.
template <typename O, bool kFinal>
__global__ void __launch_bounds__(kThreads)
    _augment_blur_pass_kernel(Sample s, int64_t tiles_x, int64_t n_tiles, int64_t kernel_size,
                              const float* taps, const float* src, float* mid, Normalize norm,
                              Output<O> out) {
  const int64_t b = blockIdx.x / n_tiles, tile = blockIdx.x % n_tiles;
  if (!(s.factors[5 * b + 4] > 0.f)) return;
  const int64_t S = s.size, pad = kernel_size / 2;
  const int64_t y0 = (tile / tiles_x) * kTile, x0 = (tile % tiles_x) * kTile;
  const float* t = taps + b * kernel_size;
  const bool solar = s.flags[4 * b + 3];
  for (int i = threadIdx.x; i < kTile * kTile; i += blockDim.x) {
    const int64_t y = y0 + i / kTile, x = x0 + i % kTile;
    if (y >= S || x >= S) continue;
    float rgb[3];
    for (int c = 0; c < 3; ++c) {
      const float* plane = src + (b * 3 + c) * S * S;
      float acc = 0.f;
      for (int64_t k = 0; k < kernel_size; ++k)
        acc += t[k] * (kFinal ? plane[reflect(y + k - pad, S) * S + x]
                              : plane[y * S + reflect(x + k - pad, S)]);
      rgb[c] = acc;
    }
    if (kFinal) {
      store(out, b, y, x, rgb, solar, norm);
    } else {
      for (int c = 0; c < 3; ++c) mid[((b * 3 + c) * S + y) * S + x] = rgb[c];
    }
  }
}

at::Tensor augment_cuda(at::TensorList images, const at::Tensor& boxes, const at::Tensor& flags,
                        const at::Tensor& factors, const at::Tensor& order, int64_t size,
                        int64_t kernel_size, at::ArrayRef<double> mean, at::ArrayRef<double> stdv,
                        at::ScalarType dtype, bool channels_last) {
  check_args(images, boxes, flags, factors, order, size, kernel_size, mean, stdv, dtype);
  TORCH_CHECK_VALUE(boxes.is_cuda(), "sslfast: augment: boxes must be on the images' device");
  const int64_t batch = static_cast<int64_t>(images.size());
  const at::cuda::CUDAGuard guard(boxes.device());
  auto opts = at::TensorOptions().dtype(dtype).device(boxes.device());
  at::Tensor out = at::empty({batch, 3, size, size}, opts,
                             channels_last ? at::MemoryFormat::ChannelsLast
                                           : at::MemoryFormat::Contiguous);
  if (batch == 0) return out;
  // The images' table travels to the device through pinned memory: no sync.
  std::vector<ImageRef> refs(batch);
  for (int64_t i = 0; i < batch; ++i) {
    const at::Tensor& t = images[i];
    refs[i] = {t.data_ptr(), t.size(1), t.size(2), t.stride(0), t.stride(1), t.stride(2),
               t.scalar_type() == at::kByte ? 1 : 0};
  }
  const int64_t table_bytes = batch * static_cast<int64_t>(sizeof(ImageRef));
  at::Tensor host = at::empty({table_bytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  std::memcpy(host.data_ptr(), refs.data(), table_bytes);
  at::Tensor table = host.to(boxes.device(), /*non_blocking=*/true);
  const at::Tensor bx = boxes.contiguous(), fl = flags.to(at::kByte).contiguous();
  const at::Tensor fc = factors.contiguous(), od = order.contiguous();
  Sample s{reinterpret_cast<const ImageRef*>(table.data_ptr()), bx.data_ptr<int64_t>(),
           fl.data_ptr<uint8_t>(), fc.data_ptr<float>(), od.data_ptr<int64_t>(), size};
  const int64_t tiles_x = (size + kTile - 1) / kTile;
  const int64_t n_tiles = tiles_x * tiles_x;
  at::Tensor partial = at::empty({batch, n_tiles}, boxes.options().dtype(at::kFloat));
  auto stream = at::cuda::getCurrentCUDAStream();
  // One block per (tile, sample) along x (no 65535 limit; 2^31 - 1).
  TORCH_CHECK_VALUE(n_tiles * batch <= std::numeric_limits<int32_t>::max(), "sslfast: augment: ",
                    batch, " images of ", n_tiles, " tiles each are more blocks than one launch "
                    "takes; pass fewer images per call");
  const dim3 grid(static_cast<unsigned>(n_tiles * batch));
  _augment_mean_kernel<<<grid, kThreads, 0, stream>>>(s, tiles_x, n_tiles, partial.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  Normalize norm;
  for (int c = 0; c < 3; ++c) {
    norm.mean[c] = static_cast<float>(mean[c]);
    norm.stdv[c] = static_cast<float>(stdv[c]);
  }
  // Large blur kernels: two (B, 3, S, S) float buffers (the chain, the rows pass)
  // and the taps instead of the haloed tile.
  const bool haloed = kernel_size <= kMaxTaps;
  const auto fopts = boxes.options().dtype(at::kFloat);
  const at::Tensor pre = haloed ? at::Tensor() : at::empty({batch, 3, size, size}, fopts);
  const int64_t E = kTile + 2 * (kernel_size / 2);
  const size_t smem = haloed ? sizeof(float) * (3 * E * E + 3 * E * kTile + kernel_size) : 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "augment_cuda", [&] {
    const Output<scalar_t> o{out.data_ptr<scalar_t>(), out.stride(0), out.stride(1),
                             out.stride(2), out.stride(3)};
    auto kernel = _augment_fwd_kernel<scalar_t>;
    if (smem > 48 * 1024)
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          static_cast<int>(smem)));
    kernel<<<grid, kThreads, smem, stream>>>(s, tiles_x, n_tiles, partial.data_ptr<float>(),
                                             kernel_size, norm, o,
                                             haloed ? nullptr : pre.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (haloed) return;
    at::Tensor taps = at::empty({batch, kernel_size}, fopts);
    at::Tensor mid = at::empty_like(pre);
    const unsigned taps_blocks = static_cast<unsigned>((batch + kThreads - 1) / kThreads);
    _augment_taps_kernel<<<taps_blocks, kThreads, 0, stream>>>(fc.data_ptr<float>(), batch,
                                                               kernel_size, taps.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    _augment_blur_pass_kernel<float, false><<<grid, kThreads, 0, stream>>>(  // writes mid only
        s, tiles_x, n_tiles, kernel_size, taps.data_ptr<float>(), pre.data_ptr<float>(),
        mid.data_ptr<float>(), norm, Output<float>{});
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    _augment_blur_pass_kernel<scalar_t, true><<<grid, kThreads, 0, stream>>>(
        s, tiles_x, n_tiles, kernel_size, taps.data_ptr<float>(), mid.data_ptr<float>(), nullptr,
        norm, o);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(sslfast, CUDA, m) { m.impl("augment", &augment_cuda); }

}  // namespace augment
}  // namespace sslfast
