// The op schemas (declared once) and the pybind11 loader module.
#include <torch/extension.h>
#include <torch/library.h>

TORCH_LIBRARY(sslfast, m) {
  // targets <- decay * targets + (1 - decay) * sources, in place. decay_tensor,
  // when given (0-dim, CPU or on the targets' device), overrides decay.
  m.def("ema_(Tensor(a!)[] targets, Tensor[] sources, Tensor? decay_tensor, float decay) -> ()");
  // Writes keys (N, dim) into the ring buffer queue (size, dim) at the device-side
  // pointer ptr (int64, one element), wrapping around, and advances ptr.
  m.def("enqueue_(Tensor(a!) queue, Tensor(b!) ptr, Tensor keys, bool normalize=False) -> ()");
  // SSL augmentation of images[i] (3, Hi, Wi) with per-sample parameters: boxes
  // (B, 4) [top, left, height, width], flags (B, 4) [flip, jitter, gray, solarize],
  // factors (B, 5) [brightness, contrast, saturation, hue, blur sigma], order (B, 4).
  m.def("augment(Tensor[] images, Tensor boxes, Tensor flags, Tensor factors, Tensor order, "
        "int size, int kernel_size, float[] mean, float[] std, ScalarType dtype, "
        "bool channels_last) -> Tensor");
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "sslfast compiled ops; they are registered as torch.ops.sslfast.*";
#ifdef SSLFAST_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
