// Argument checks of enqueue_, shared by the CPU and CUDA launchers.
#pragma once

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>

#include <cstdint>
#include <limits>

#include "common/sslfast_common.h"

namespace sslfast {
namespace enqueue {

// Whether two tensors may share memory (same storage and not provably disjoint).
inline bool may_overlap(const at::Tensor& a, const at::Tensor& b) {
  if (a.numel() == 0 || b.numel() == 0) return false;
  if (!a.storage().is_alias_of(b.storage())) return false;
  return at::get_overlap_status(a, b) != at::MemOverlapStatus::No;
}

inline void check_args(const at::Tensor& queue, const at::Tensor& ptr, const at::Tensor& keys) {
  TORCH_CHECK_VALUE(queue.dim() == 2, "sslfast: enqueue_: queue must be 2-D (size, dim), got shape ",
                    queue.sizes());
  TORCH_CHECK_TYPE(queue.scalar_type() == at::kFloat || queue.scalar_type() == at::kBFloat16 ||
                       queue.scalar_type() == at::kHalf || queue.scalar_type() == at::kDouble,
                   "sslfast: enqueue_: queue must be float32, bfloat16, float16 or float64, got ",
                   queue.scalar_type());
  TORCH_CHECK_VALUE(queue.size(0) > 0, "sslfast: enqueue_: queue has size 0 (no rows)");
  TORCH_CHECK_VALUE(queue.size(0) <= std::numeric_limits<int32_t>::max(),
                    "sslfast: enqueue_: queue has ", queue.size(0), " rows, more than 2^31 - 1");
  TORCH_CHECK_VALUE(queue.is_contiguous(), "sslfast: enqueue_: queue must be contiguous");
  TORCH_CHECK_TYPE(ptr.scalar_type() == at::kLong, "sslfast: enqueue_: ptr must be int64, got ",
                   ptr.scalar_type());
  TORCH_CHECK_VALUE(ptr.numel() == 1, "sslfast: enqueue_: ptr must have one element, got shape ",
                    ptr.sizes());
  TORCH_CHECK_VALUE(ptr.device() == queue.device(), "sslfast: enqueue_: ptr is on ", ptr.device(),
                    " but queue is on ", queue.device());
  TORCH_CHECK_VALUE(keys.dim() == 2, "sslfast: enqueue_: keys must be 2-D (batch, dim), got shape ",
                    keys.sizes());
  TORCH_CHECK_VALUE(keys.device() == queue.device(), "sslfast: enqueue_: keys is on ",
                    keys.device(), " but queue is on ", queue.device());
  TORCH_CHECK_TYPE(keys.scalar_type() == queue.scalar_type(), "sslfast: enqueue_: keys is ",
                   keys.scalar_type(), " but queue is ", queue.scalar_type());
  TORCH_CHECK_VALUE(keys.size(1) == queue.size(1), "sslfast: enqueue_: keys has dimension ",
                    keys.size(1), " but queue has ", queue.size(1));
  TORCH_CHECK_VALUE(!may_overlap(queue, keys),
                    "sslfast: enqueue_: keys shares memory with queue");
  TORCH_CHECK_VALUE(!may_overlap(queue, ptr),
                    "sslfast: enqueue_: ptr shares memory with queue");
}

}  // namespace enqueue
}  // namespace sslfast
