// The EMA update of one element, shared by the CPU loop and the CUDA kernel.
#pragma once

#include "common/sslfast_common.h"

namespace sslfast {
namespace ema {

// t <- decay * t + (1 - decay) * s, written as torch.lerp(t, s, w) with
// w = 1 - decay: for small w, t + w * (s - t), else s - (s - t) * (1 - w).
// This is the form torch._foreach_lerp_ (and so timm's ModelEmaV3) uses, and
// keeps w -> 0 (decay -> 1) exact: t is returned unchanged.
template <typename A>
SSLFAST_HD A lerp(A t, A s, A w) {
  const A d = s - t;
  return (w < A(0.5)) ? t + w * d : s - d * (A(1) - w);
}

// One storage element: load both in the accumulation type, update, round once.
template <typename T, typename S>
SSLFAST_HD T update(T t, S s, acc_t<T> w) {
  using A = acc_t<T>;
  return from_acc<T>(lerp<A>(to_acc<A>(t), to_acc<A>(s), w));
}

}  // namespace ema
}  // namespace sslfast
