// Argument checks of the augment op, shared by the CPU and CUDA launchers.
#pragma once

#include <ATen/ATen.h>

#include "common/sslfast_common.h"

namespace sslfast {
namespace augment {

inline void check_args(at::TensorList images, const at::Tensor& boxes, const at::Tensor& flags,
                       const at::Tensor& factors, const at::Tensor& order, int64_t size,
                       int64_t kernel_size, at::ArrayRef<double> mean, at::ArrayRef<double> stdv,
                       at::ScalarType dtype) {
  const int64_t batch = static_cast<int64_t>(images.size());
  for (int64_t i = 0; i < batch; ++i) {
    const at::Tensor& t = images[i];
    TORCH_CHECK_VALUE(t.dim() == 3 && t.size(0) == 3, "sslfast: augment: images[", i,
                      "] must be (3, H, W), got shape ", t.sizes());
    TORCH_CHECK_TYPE(t.scalar_type() == at::kByte || t.scalar_type() == at::kFloat,
                     "sslfast: augment: images[", i, "] must be uint8 or float32, got ",
                     t.scalar_type());
    TORCH_CHECK_VALUE(t.size(1) > 0 && t.size(2) > 0, "sslfast: augment: images[", i,
                      "] is empty");
    TORCH_CHECK_VALUE(t.device() == boxes.device(), "sslfast: augment: images[", i, "] is on ",
                      t.device(), " but the parameters are on ", boxes.device());
  }
  for (const at::Tensor* t : {&flags, &factors, &order})
    TORCH_CHECK_VALUE(t->device() == boxes.device(), "sslfast: augment: the parameters are on ",
                      t->device(), " and ", boxes.device(), "; they must share one device");
  TORCH_CHECK_VALUE(boxes.sizes() == at::IntArrayRef({batch, 4}) && boxes.scalar_type() == at::kLong,
                    "sslfast: augment: boxes must be int64 (", batch, ", 4)");
  TORCH_CHECK_VALUE(flags.sizes() == at::IntArrayRef({batch, 4}),
                    "sslfast: augment: flags must be (", batch, ", 4)");
  TORCH_CHECK_VALUE(factors.sizes() == at::IntArrayRef({batch, 5}) &&
                        factors.scalar_type() == at::kFloat,
                    "sslfast: augment: factors must be float32 (", batch, ", 5)");
  TORCH_CHECK_VALUE(order.sizes() == at::IntArrayRef({batch, 4}) && order.scalar_type() == at::kLong,
                    "sslfast: augment: order must be int64 (", batch, ", 4)");
  TORCH_CHECK_VALUE(size > 0, "sslfast: augment: size must be positive");
  if (boxes.device().is_cpu()) {  // on a GPU this would sync: the sampler keeps boxes inside
    const at::Tensor bx = boxes.contiguous();
    const int64_t* b = bx.data_ptr<int64_t>();
    for (int64_t i = 0; i < batch; ++i, b += 4)
      TORCH_CHECK_VALUE(b[0] >= 0 && b[1] >= 0 && b[2] > 0 && b[3] > 0 &&
                            b[0] + b[2] <= images[i].size(1) && b[1] + b[3] <= images[i].size(2),
                        "sslfast: augment: crop box ", i, " (top ", b[0], ", left ", b[1],
                        ", height ", b[2], ", width ", b[3], ") is not inside images[", i,
                        "] of size ", images[i].size(1), "x", images[i].size(2));
  }
  TORCH_CHECK_VALUE(kernel_size > 0 && kernel_size % 2 == 1 && kernel_size / 2 < size,
                    "sslfast: augment: kernel_size must be odd and its half below size, got ",
                    kernel_size, " for size ", size);
  TORCH_CHECK_VALUE(mean.size() == 3 && stdv.size() == 3, "sslfast: augment: mean and std need 3 values");
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
                   "sslfast: augment: dtype must be float32, bfloat16 or float16");
}

}  // namespace augment
}  // namespace sslfast
