// Per-pixel math of the SSL augmentation pipeline (SEMANTICS.md §6), written once
// for the CPU loop and the CUDA kernel. Each function follows the float32
// arithmetic of the torchvision.transforms.v2.functional op it stands for.
#pragma once

#include <cmath>
#include <cstdint>

#include "common/sslfast_common.h"

namespace sslfast {
namespace augment {

#ifdef __CUDA_ARCH__
#define SSLFAST_FLOORF floorf
#define SSLFAST_EXPF expf
#else
#define SSLFAST_FLOORF std::floor
#define SSLFAST_EXPF std::exp
#endif

SSLFAST_HD float fmax2(float a, float b) { return a > b ? a : b; }
SSLFAST_HD float fmin2(float a, float b) { return a < b ? a : b; }
SSLFAST_HD float clamp01(float x) { return fmin2(fmax2(x, 0.f), 1.f); }

// ---- antialiased bilinear resize (ATen's _upsample_bilinear2d_aa, align_corners=False)

SSLFAST_HD float aa_filter(float x) {
  x = x < 0.f ? -x : x;
  return x < 1.f ? 1.f - x : 0.f;
}

// The source window of output index i: [xmin, xmin + xsize) and the filter's
// centre and inverse scale; the weights are aa_filter((j + xmin - center + 0.5) *
// invscale) normalized by their sum.
struct AAWindow {
  int64_t xmin, xsize;
  float center, invscale;
};

SSLFAST_HD AAWindow aa_window(int64_t i, int64_t in_size, int64_t out_size) {
  const float scale = static_cast<float>(in_size) / static_cast<float>(out_size);
  const float support = scale >= 1.f ? scale : 1.f;  // bilinear: interp_size / 2 = 1
  AAWindow w;
  w.center = scale * (static_cast<float>(i) + 0.5f);
  w.invscale = scale >= 1.f ? 1.f / scale : 1.f;
  const int64_t lo = static_cast<int64_t>(w.center - support + 0.5f);
  w.xmin = lo > 0 ? lo : 0;
  const int64_t hi = static_cast<int64_t>(w.center + support + 0.5f);
  w.xsize = (hi < in_size ? hi : in_size) - w.xmin;
  return w;
}

SSLFAST_HD float aa_weight(const AAWindow& w, int64_t j) {
  return aa_filter((static_cast<float>(j + w.xmin) - w.center + 0.5f) * w.invscale);
}

// ---- color

SSLFAST_HD float gray(float r, float g, float b) { return r * 0.2989f + g * 0.587f + b * 0.114f; }

// _blend(a, b, ratio) = clamp(ratio * a + (1 - ratio) * b)
SSLFAST_HD float blend(float a, float b, float ratio) { return clamp01(ratio * a + (1.f - ratio) * b); }

// torch.remainder(x, 1) for floats: x - floor(x)
SSLFAST_HD float remainder1(float x) { return x - SSLFAST_FLOORF(x); }

// adjust_hue: RGB -> HSV (torchvision's _rgb_to_hsv), h += hue mod 1, HSV -> RGB.
SSLFAST_HD void adjust_hue(float& r, float& g, float& b, float hue) {
  const float maxc = fmax2(fmax2(r, g), b);
  const float minc = fmin2(fmin2(r, g), b);
  const bool eqc = maxc == minc;
  const float range = maxc - minc;
  const float s = range / (eqc ? 1.f : maxc);
  const float div = eqc ? 1.f : range;
  const float rc = (maxc - r) / div, gc = (maxc - g) / div, bc = (maxc - b) / div;
  const bool neq_r = maxc != r, eq_g = maxc == g;
  // (bitwise & on bools: no short-circuit branch, so the loop vectorizes)
  const float hg = (rc + 2.f - bc) * (eq_g & neq_r ? 1.f : 0.f);
  const float hr = (bc - gc) * (neq_r ? 0.f : 1.f);
  const float hb = (gc + 4.f - rc) * (neq_r & !eq_g ? 1.f : 0.f);
  // fmod(x, 1) for x in [5/6, 11/6): x - floor(x), exact for such x
  float h = (hr + hg + hb) * (1.f / 6.f) + 1.f;
  h = h - SSLFAST_FLOORF(h);
  h = remainder1(h + hue);
  const float v = maxc;
  const float h6 = h * 6.f;
  const float fi = SSLFAST_FLOORF(h6);
  const float f = h6 - fi;
  const float i = fi >= 6.f ? fi - 6.f : fi;  // (int)floor(h6) mod 6, h6 in [0, 6]
  const float sxf = s * f;
  const float one_minus_s = 1.f - s;
  const float q = clamp01((1.f - sxf) * v);
  const float t = clamp01((sxf + one_minus_s) * v);
  const float p = clamp01(one_minus_s * v);
  // torchvision's vpqt select table as exact 0/1 weights (branch-free, vectorizable):
  // exactly one weight is 1, and v, p, q, t are finite.
  const float i0 = i == 0.f ? 1.f : 0.f, i1 = i == 1.f ? 1.f : 0.f, i2 = i == 2.f ? 1.f : 0.f,
              i3 = i == 3.f ? 1.f : 0.f, i4 = i == 4.f ? 1.f : 0.f, i5 = i == 5.f ? 1.f : 0.f;
  r = v * (i0 + i5) + q * i1 + p * (i2 + i3) + t * i4;
  g = v * (i1 + i2) + t * i0 + q * i3 + p * (i4 + i5);
  b = v * (i3 + i4) + t * i2 + q * i5 + p * (i0 + i1);
}

// ---- blur

// Weight k of the 1-D Gaussian (before normalization): torchvision places the
// taps at linspace(-lim, lim, size), lim = (size - 1) / (2 sqrt 2), and weights
// them exp(-(x / sigma)^2) (= exp(-d^2 / (2 sigma^2)) for the tap's offset d).
SSLFAST_HD float gaussian_tap(int64_t k, int64_t size, float sigma) {
  const float lim = static_cast<float>(size - 1) / (2.f * 1.41421356237309505f);
  const float step = size > 1 ? 2.f * lim / static_cast<float>(size - 1) : 0.f;
  const float x = -lim + step * static_cast<float>(k);
  const float z = x / sigma;
  return SSLFAST_EXPF(-(z * z));
}

// torch.nn.functional.pad(mode="reflect") index (pad < n).
SSLFAST_HD int64_t reflect(int64_t i, int64_t n) {
  if (i < 0) return -i;
  if (i >= n) return 2 * (n - 1) - i;
  return i;
}

SSLFAST_HD float solarize(float x) { return x >= 0.5f ? 1.f - x : x; }

}  // namespace augment
}  // namespace sslfast
