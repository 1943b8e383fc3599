// CPU EMA: one parallel loop over all tensors laid end to end, split by element
// count, so that hundreds of small tensors and a few huge ones keep every core busy.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "ema/ema_math.h"
#include "ema/ema_plan.h"

namespace sslfast {
namespace ema {
namespace {

constexpr int64_t kCpuGrain = 1 << 15;  // elements per task at least: 128 KiB of fp32

template <typename T, typename S>
SSLFAST_CPU_CLONES void update_span(T* __restrict__ t, const S* __restrict__ s, int64_t n,
                                    acc_t<T> w) {
  // Hoisting the branch of lerp out of the loop lets the compiler vectorize it.
  if (w < acc_t<T>(0.5)) {
    for (int64_t i = 0; i < n; ++i) t[i] = update<T, S>(t[i], s[i], w);
  } else {
    for (int64_t i = 0; i < n; ++i) t[i] = update<T, S>(t[i], s[i], w);
  }
}

struct UpdateSpan {
  const Region& r;
  int64_t begin, end;
  double w;
  template <typename T, typename S>
  void operator()() const {
    update_span<T, S>(static_cast<T*>(r.target) + begin, static_cast<const S*>(r.source) + begin,
                      end - begin, static_cast<acc_t<T>>(w));
  }
};

void ema_cpu_(at::TensorList targets, at::TensorList sources,
              const c10::optional<at::Tensor>& decay_tensor, double decay) {
  if (decay_tensor.has_value()) {
    const at::Tensor& d = *decay_tensor;
    TORCH_CHECK_VALUE(d.dim() == 0 && d.is_floating_point(),
                      "sslfast: decay must be a 0-dim floating-point tensor");
    TORCH_CHECK_VALUE(d.device().is_cpu(), "sslfast: decay is on ", d.device(),
                      " but targets are on the CPU");
    decay = d.item<double>();
  }
  check_decay_value(decay);
  Plan plan = make_plan(targets, sources);
  const double w = 1.0 - decay;

  // All tensors laid end to end: split that range by element count, so that
  // threads get equal work however the sizes are distributed.
  std::vector<int64_t> start(plan.regions.size() + 1, 0);
  for (size_t r = 0; r < plan.regions.size(); ++r) start[r + 1] = start[r] + plan.regions[r].numel;
  at::parallel_for(0, start.back(), kCpuGrain, [&](int64_t lo, int64_t hi) {
    size_t r = std::upper_bound(start.begin(), start.end(), lo) - start.begin() - 1;
    for (; lo < hi; ++r) {
      const int64_t end = std::min(hi, start[r + 1]);
      if (end > lo)
        dispatch_dtype_pair(plan.regions[r].pair,
                            UpdateSpan{plan.regions[r], lo - start[r], end - start[r], w});
      lo = end;
    }
  });
  finish_plan(plan);
}

}  // namespace

TORCH_LIBRARY_IMPL(sslfast, CPU, m) { m.impl("ema_", &ema_cpu_); }

}  // namespace ema
}  // namespace sslfast
