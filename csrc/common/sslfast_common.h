// Shared by every C++ op: the SSLFAST_HD macro, scalar conversions, argument
// checks and dtype dispatch. Nothing here is op-specific.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <string>
#include <type_traits>

// Per-element math is written once, as inline functions marked SSLFAST_HD, and
// called from both the CPU loops and the CUDA kernels.
#if defined(__CUDACC__) || defined(__HIPCC__)
#define SSLFAST_HD __host__ __device__ __forceinline__
#else
#define SSLFAST_HD inline
#endif

// CPU loops: on x86-64 with GCC an AVX2 clone is chosen at load time besides
// the baseline (the build targets the baseline so the wheel runs anywhere).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && !defined(__CUDACC__)
#define SSLFAST_CPU_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define SSLFAST_CPU_CLONES
#endif

namespace sslfast {

// Arithmetic type used for a storage type: fp32 for everything narrower,
// fp64 for fp64.
template <typename T>
struct acc_type {
  using type = float;
};
template <>
struct acc_type<double> {
  using type = double;
};
template <typename T>
using acc_t = typename acc_type<T>::type;

template <typename A, typename T>
SSLFAST_HD A to_acc(T v) {
  return static_cast<A>(v);
}

template <typename T, typename A>
SSLFAST_HD T from_acc(A v) {
  // c10::Half / c10::BFloat16 round to nearest even from float.
  return static_cast<T>(v);
}

// ---- argument checks (Python-facing errors: ValueError / TypeError) ----

inline void check_floating(const at::Tensor& t, const char* arg, int64_t index) {
  TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()), "sslfast: ", arg, "[", index,
                   "] must be a floating-point tensor, got ", t.scalar_type());
}

inline void check_same_shape(const at::Tensor& a, const at::Tensor& b, const char* arg_a,
                             const char* arg_b, int64_t index) {
  TORCH_CHECK_VALUE(a.sizes() == b.sizes(), "sslfast: ", arg_a, "[", index, "] has shape ",
                    a.sizes(), " but ", arg_b, "[", index, "] has shape ", b.sizes());
}

inline void check_same_device(const at::Tensor& a, const at::Tensor& b, const char* arg_a,
                              const char* arg_b, int64_t index) {
  TORCH_CHECK_VALUE(a.device() == b.device(), "sslfast: ", arg_a, "[", index, "] is on ",
                    a.device(), " but ", arg_b, "[", index, "] is on ", b.device());
}

// ---- dtype dispatch over (target, source) storage pairs ----
//
// Supported pairs: same dtype (fp64, fp32, bf16, fp16), and an fp32 target
// with a bf16 or fp16 source (fp32 shadow of a low-precision model).
enum class DtypePair : int { F64F64, F32F32, F32BF16, F32F16, BF16BF16, F16F16, Unsupported };

inline DtypePair dtype_pair(at::ScalarType t, at::ScalarType s) {
  using ST = at::ScalarType;
  if (t == s) {
    switch (t) {
      case ST::Double: return DtypePair::F64F64;
      case ST::Float: return DtypePair::F32F32;
      case ST::BFloat16: return DtypePair::BF16BF16;
      case ST::Half: return DtypePair::F16F16;
      default: return DtypePair::Unsupported;
    }
  }
  if (t == ST::Float && s == ST::BFloat16) return DtypePair::F32BF16;
  if (t == ST::Float && s == ST::Half) return DtypePair::F32F16;
  return DtypePair::Unsupported;
}

// Calls fn.template operator()<T, S>() for the storage types of a pair.
template <typename Fn>
void dispatch_dtype_pair(DtypePair pair, Fn&& fn) {
  switch (pair) {
    case DtypePair::F64F64: fn.template operator()<double, double>(); break;
    case DtypePair::F32F32: fn.template operator()<float, float>(); break;
    case DtypePair::F32BF16: fn.template operator()<float, c10::BFloat16>(); break;
    case DtypePair::F32F16: fn.template operator()<float, c10::Half>(); break;
    case DtypePair::BF16BF16: fn.template operator()<c10::BFloat16, c10::BFloat16>(); break;
    case DtypePair::F16F16: fn.template operator()<c10::Half, c10::Half>(); break;
    default: TORCH_CHECK_TYPE(false, "sslfast: unsupported dtype pair");
  }
}

}  // namespace sslfast
