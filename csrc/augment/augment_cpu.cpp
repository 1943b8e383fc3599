// CPU augmentation: one task per image, the whole pipeline in a per-image scratch
// buffer that stays in cache: antialiased resize of the crop straight from the
// source (separable), flip, the jitter ops in the sample's order (contrast's mean
// taken over the image as it is then), grayscale, separable Gaussian blur with
// reflect padding, solarize, normalize, one write per output element.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "augment/augment_checks.h"
#include "augment/augment_math.h"

namespace sslfast {
namespace augment {
namespace {

struct Image {
  const void* data;
  at::ScalarType dtype;
  int64_t height, width, stride_c, stride_h, stride_w;
};

template <typename T>
inline float pixel(const T* p) {
  if constexpr (std::is_same<T, uint8_t>::value) {
    return static_cast<float>(*p) / 255.f;
  } else {
    return static_cast<float>(*p);
  }
}

// Resized crop into buf (3, S, S), flipped when asked: a horizontal pass over the
// crop's rows (each source row converted to float once), then a vertical pass.
template <typename T>
SSLFAST_CPU_CLONES void resize_crop(const Image& img, const int64_t* box, bool flip, int64_t S,
                                    float* buf, std::vector<float>& tmp) {
  const int64_t top = box[0], left = box[1], h = box[2], w = box[3];
  const T* src = static_cast<const T*>(img.data);
  // Normalized weights of every output column. Each window is computed once: two
  // evaluations could differ where the compiler contracts them differently (FMA).
  std::vector<AAWindow> wins(S);
  int64_t wmax = 1;
  for (int64_t x = 0; x < S; ++x) {
    wins[x] = aa_window(x, w, S);
    wmax = std::max(wmax, wins[x].xsize);
  }
  std::vector<float> wx(S * wmax, 0.f), row(w);
  for (int64_t x = 0; x < S; ++x) {
    const AAWindow& win = wins[x];
    float total = 0.f;
    for (int64_t j = 0; j < win.xsize; ++j) total += aa_weight(win, j);
    for (int64_t j = 0; j < win.xsize; ++j)
      wx[x * wmax + j] = total != 0.f ? aa_weight(win, j) / total : 0.f;
  }
  tmp.resize(3 * h * S);
  for (int64_t c = 0; c < 3; ++c)
    for (int64_t r = 0; r < h; ++r) {
      const T* in = src + c * img.stride_c + (top + r) * img.stride_h + left * img.stride_w;
      for (int64_t j = 0; j < w; ++j) row[j] = pixel(in + j * img.stride_w);
      float* out = tmp.data() + (c * h + r) * S;
      for (int64_t x = 0; x < S; ++x) {
        const float* wt = wx.data() + x * wmax;
        const float* px = row.data() + wins[x].xmin;
        float acc = 0.f;
        for (int64_t j = 0; j < wins[x].xsize; ++j) acc += wt[j] * px[j];
        out[x] = acc;
      }
    }
  for (int64_t y = 0; y < S; ++y) {
    const AAWindow win = aa_window(y, h, S);
    float total = 0.f;
    for (int64_t j = 0; j < win.xsize; ++j) total += aa_weight(win, j);
    for (int64_t c = 0; c < 3; ++c) {
      float* out = buf + (c * S + y) * S;
      for (int64_t x = 0; x < S; ++x) out[x] = 0.f;
      for (int64_t j = 0; j < win.xsize; ++j) {
        const float wt = total != 0.f ? aa_weight(win, j) / total : 0.f;
        const float* in = tmp.data() + (c * h + win.xmin + j) * S;
        for (int64_t x = 0; x < S; ++x) out[x] += wt * in[x];
      }
      if (flip) std::reverse(out, out + S);
    }
  }
}

SSLFAST_CPU_CLONES void hue_plane(float* __restrict__ R, float* __restrict__ G,
                                  float* __restrict__ B, int64_t n, float hue) {
  for (int64_t i = 0; i < n; ++i) {
    float r = R[i], g = G[i], b = B[i];
    adjust_hue(r, g, b, hue);
    R[i] = r;
    G[i] = g;
    B[i] = b;
  }
}

SSLFAST_CPU_CLONES void color(float* buf, int64_t S, const float* f, const int64_t* order) {
  const int64_t n = S * S;
  float* R = buf;
  float* G = buf + n;
  float* B = buf + 2 * n;
  for (int k = 0; k < 4; ++k) {
    // A neutral factor (a strength of 0) leaves the image as it is: skipped, as
    // torchvision's ColorJitter skips the op.
    const int64_t op = order[k];
    if (op < 0 || op > 3) continue;  // not a jitter op (the sampler never makes one)
    if (op == 3 ? f[3] == 0.f : f[op] == 1.f) continue;
    switch (op) {
      case 0:
        for (int64_t i = 0; i < 3 * n; ++i) buf[i] = blend(buf[i], 0.f, f[0]);
        break;
      case 1: {
        double sum = 0.0;  // torch.mean's float32 result, summed more exactly here
        for (int64_t i = 0; i < n; ++i) sum += gray(R[i], G[i], B[i]);
        const float mean = static_cast<float>(sum / static_cast<double>(n));
        for (int64_t i = 0; i < 3 * n; ++i) buf[i] = blend(buf[i], mean, f[1]);
        break;
      }
      case 2:
        for (int64_t i = 0; i < n; ++i) {
          const float l = gray(R[i], G[i], B[i]);
          R[i] = blend(R[i], l, f[2]);
          G[i] = blend(G[i], l, f[2]);
          B[i] = blend(B[i], l, f[2]);
        }
        break;
      default:
        hue_plane(R, G, B, n, f[3]);
        break;
    }
  }
}

// Separable Gaussian blur with reflect padding; each pass's inner loop runs along
// a row (vectorizable), taps accumulated in order.
SSLFAST_CPU_CLONES void blur(float* buf, int64_t S, int64_t K, float sigma,
                             std::vector<float>& tmp) {
  std::vector<float> taps(K);
  float total = 0.f;
  for (int64_t k = 0; k < K; ++k) total += (taps[k] = gaussian_tap(k, K, sigma));
  for (auto& t : taps) t /= total;
  const int64_t pad = K / 2;
  std::vector<float> row(S + 2 * pad);
  tmp.resize(3 * S * S);
  for (int64_t c = 0; c < 3; ++c) {
    float* plane = buf + c * S * S;
    float* mid = tmp.data() + c * S * S;
    for (int64_t y = 0; y < S; ++y) {  // horizontal
      const float* in = plane + y * S;
      for (int64_t i = 0; i < S + 2 * pad; ++i) row[i] = in[reflect(i - pad, S)];
      float* out = mid + y * S;
      for (int64_t x = 0; x < S; ++x) out[x] = 0.f;
      for (int64_t k = 0; k < K; ++k) {
        const float t = taps[k];
        const float* r = row.data() + k;
        for (int64_t x = 0; x < S; ++x) out[x] += t * r[x];
      }
    }
    for (int64_t y = 0; y < S; ++y) {  // vertical
      float* out = plane + y * S;
      for (int64_t x = 0; x < S; ++x) out[x] = 0.f;
      for (int64_t k = 0; k < K; ++k) {
        const float t = taps[k];
        const float* r = mid + reflect(y + k - pad, S) * S;
        for (int64_t x = 0; x < S; ++x) out[x] += t * r[x];
      }
    }
  }
}

template <typename O>
SSLFAST_CPU_CLONES void finish(const float* buf, int64_t S, bool solar,
                               const std::vector<double>& mean, const std::vector<double>& stdv,
                               O* out, int64_t sc, int64_t sh, int64_t sw) {
  for (int64_t c = 0; c < 3; ++c) {
    const float m = static_cast<float>(mean[c]), sd = static_cast<float>(stdv[c]);
    for (int64_t y = 0; y < S; ++y) {
      const float* in = buf + (c * S + y) * S;
      O* o = out + c * sc + y * sh;
      if (sw == 1) {
        for (int64_t x = 0; x < S; ++x)
          o[x] = static_cast<O>(((solar ? solarize(in[x]) : in[x]) - m) / sd);
      } else {
        for (int64_t x = 0; x < S; ++x)
          o[x * sw] = static_cast<O>(((solar ? solarize(in[x]) : in[x]) - m) / sd);
      }
    }
  }
}

void to_gray(float* buf, int64_t S) {
  const int64_t n = S * S;
  for (int64_t i = 0; i < n; ++i)
    buf[i] = buf[n + i] = buf[2 * n + i] = gray(buf[i], buf[n + i], buf[2 * n + i]);
}

at::Tensor augment_cpu(at::TensorList images, const at::Tensor& boxes, const at::Tensor& flags,
                       const at::Tensor& factors, const at::Tensor& order, int64_t size,
                       int64_t kernel_size, at::ArrayRef<double> mean, at::ArrayRef<double> stdv,
                       at::ScalarType dtype, bool channels_last) {
  check_args(images, boxes, flags, factors, order, size, kernel_size, mean, stdv, dtype);
  const int64_t batch = static_cast<int64_t>(images.size());
  auto opts = at::TensorOptions().dtype(dtype).device(at::kCPU);
  at::Tensor out = at::empty({batch, 3, size, size}, opts,
                             channels_last ? at::MemoryFormat::ChannelsLast
                                           : at::MemoryFormat::Contiguous);
  if (batch == 0) return out;
  const at::Tensor bx = boxes.contiguous(), fl = flags.to(at::kByte).contiguous();
  const at::Tensor fc = factors.contiguous(), od = order.contiguous();
  const std::vector<double> mean_v(mean.begin(), mean.end()), std_v(stdv.begin(), stdv.end());
  std::vector<Image> imgs;
  for (const auto& t : images)
    imgs.push_back({t.data_ptr(), t.scalar_type(), t.size(1), t.size(2), t.stride(0), t.stride(1),
                    t.stride(2)});
  at::parallel_for(0, batch, 1, [&](int64_t lo, int64_t hi) {
    std::vector<float> buf(3 * size * size), tmp;
    for (int64_t b = lo; b < hi; ++b) {
      const int64_t* box = bx.data_ptr<int64_t>() + 4 * b;
      const uint8_t* f = fl.data_ptr<uint8_t>() + 4 * b;  // flip, jitter, gray, solarize
      const float* fac = fc.data_ptr<float>() + 5 * b;     // b, c, s, hue, sigma
      if (imgs[b].dtype == at::kByte)
        resize_crop<uint8_t>(imgs[b], box, f[0], size, buf.data(), tmp);
      else
        resize_crop<float>(imgs[b], box, f[0], size, buf.data(), tmp);
      if (f[1]) color(buf.data(), size, fac, od.data_ptr<int64_t>() + 4 * b);
      if (f[2]) to_gray(buf.data(), size);  // grayscale (before the blur: it commutes)
      if (fac[4] > 0.f) blur(buf.data(), size, kernel_size, fac[4], tmp);
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "augment_cpu", [&] {
        scalar_t* o = out.data_ptr<scalar_t>() + b * out.stride(0);
        finish<scalar_t>(buf.data(), size, f[3], mean_v, std_v, o, out.stride(1),
                         out.stride(2), out.stride(3));
      });
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(sslfast, CPU, m) { m.impl("augment", &augment_cpu); }

}  // namespace augment
}  // namespace sslfast
