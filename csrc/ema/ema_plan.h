// Host-side preparation shared by the CPU and CUDA EMA launchers: argument
// checks, and the flat list of (target, source, numel) regions to update.
#pragma once

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <c10/util/Optional.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "common/sslfast_common.h"

namespace sslfast {
namespace ema {

struct Region {
  void* target;
  const void* source;
  int64_t numel;
  DtypePair pair;
};

struct Plan {
  std::vector<Region> regions;
  // Targets that are not dense in memory are updated in a dense copy, then
  // written back; sources that do not share the target's layout are copied.
  std::vector<std::pair<at::Tensor, at::Tensor>> write_back;
  std::vector<at::Tensor> keep_alive;
};

// Targets may not share memory with one another: their updates run concurrently
// (GPU blocks, CPU threads), so a tensor passed twice (a tied parameter listed under
// two names, say) would be updated once or twice by chance. Spans sorted by start;
// a pair whose spans meet is compared exactly (views that interleave without
// sharing an element, such as two columns of one matrix, pass).
inline void check_disjoint_targets(at::TensorList targets) {
  struct Span {
    uintptr_t begin, end;
    int64_t index;
  };
  std::vector<Span> spans;
  spans.reserve(targets.size());
  for (size_t i = 0; i < targets.size(); ++i) {
    const at::Tensor& t = targets[i];
    if (t.numel() == 0) continue;
    int64_t last = 0;  // offset of the last element (strides are not negative)
    for (int64_t d = 0; d < t.dim(); ++d) last += (t.size(d) - 1) * t.stride(d);
    const auto begin = reinterpret_cast<uintptr_t>(t.data_ptr());
    spans.push_back({begin, begin + static_cast<uintptr_t>((last + 1) * t.element_size()),
                     static_cast<int64_t>(i)});
  }
  std::sort(spans.begin(), spans.end(),
            [](const Span& a, const Span& b) { return a.begin < b.begin; });
  const Span* reach = nullptr;  // the span reaching furthest so far
  for (const Span& s : spans) {
    if (reach != nullptr && s.begin < reach->end) {
      const auto status = at::get_overlap_status(targets[reach->index], targets[s.index]);
      TORCH_CHECK_VALUE(status != at::MemOverlapStatus::Full &&
                            status != at::MemOverlapStatus::Partial,
                        "sslfast: targets[", std::min(reach->index, s.index), "] and targets[",
                        std::max(reach->index, s.index),
                        "] share memory (the same tensor twice, e.g. a tied parameter?); each "
                        "target may appear once");
    }
    if (reach == nullptr || s.end > reach->end) reach = &s;
  }
}

inline void check_decay_value(double decay) {
  TORCH_CHECK_VALUE(decay >= 0.0 && decay <= 1.0, "sslfast: decay must be in [0, 1], got ", decay);
}

// Validates the lists and flattens them into dense regions with identical
// element order in target and source.
inline Plan make_plan(at::TensorList targets, at::TensorList sources) {
  TORCH_CHECK_VALUE(targets.size() == sources.size(), "sslfast: targets has ", targets.size(),
                    " tensors but sources has ", sources.size());
  Plan plan;
  plan.regions.reserve(targets.size());
  for (size_t i = 0; i < targets.size(); ++i) {
    const at::Tensor& t = targets[i];
    const at::Tensor& s = sources[i];
    const int64_t idx = static_cast<int64_t>(i);
    check_floating(t, "targets", idx);
    check_floating(s, "sources", idx);
    check_same_shape(t, s, "targets", "sources", idx);
    check_same_device(t, s, "targets", "sources", idx);
    check_same_device(t, targets[0], "targets", "targets", idx);
    const DtypePair pair = dtype_pair(t.scalar_type(), s.scalar_type());
    TORCH_CHECK_TYPE(pair != DtypePair::Unsupported, "sslfast: targets[", idx, "] is ",
                     t.scalar_type(), " and sources[", idx, "] is ", s.scalar_type(),
                     "; supported: equal float dtypes, or a float32 target with a bfloat16 or "
                     "float16 source");
    TORCH_CHECK_VALUE(at::has_internal_overlap(t) != at::MemOverlap::Yes, "sslfast: targets[", idx,
                      "] has elements that share memory (e.g. from expand()); it cannot be "
                      "updated in place");
    if (t.numel() == 0) continue;
    at::Tensor dense_t = t;
    if (!t.is_non_overlapping_and_dense()) {
      dense_t = t.contiguous();
      plan.write_back.emplace_back(t, dense_t);
    }
    at::Tensor dense_s = s;
    if (!s.is_non_overlapping_and_dense() || s.strides() != dense_t.strides()) {
      dense_s = at::empty_like(dense_t, s.options()).copy_(s);
      plan.keep_alive.push_back(dense_s);
    }
    plan.regions.push_back({dense_t.data_ptr(), dense_s.data_ptr(), t.numel(), pair});
  }
  check_disjoint_targets(targets);
  return plan;
}

inline void finish_plan(Plan& plan) {
  for (auto& tw : plan.write_back) tw.first.copy_(tw.second);
}

}  // namespace ema
}  // namespace sslfast
