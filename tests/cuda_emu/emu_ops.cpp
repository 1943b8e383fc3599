// The emulator's controls, as ops beside the emulated ones (torch.ops.sslfast_emu.*).
#include <torch/library.h>

#include "cuda_emu.h"

namespace {

void configure(int64_t seed, bool cpu_tensors_are_host, int64_t optin_smem_bytes) {
  cuda_emu::Runtime& r = cuda_emu::rt();
  r.seed = static_cast<uint64_t>(seed);
  r.rng.seed(r.seed);
  r.cpu_tensors_are_host = cpu_tensors_are_host;
  r.optin_smem_bytes = static_cast<size_t>(optin_smem_bytes);
  r.max_dynamic_smem.clear();
  r.launches.clear();
}

// The launches since the last call, one per line: kernel, grid, block, dynamic smem.
std::string launches() {
  std::string out;
  for (const std::string& l : cuda_emu::rt().launches) out += l + "\n";
  cuda_emu::rt().launches.clear();
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sslfast_emu, m) {
  m.def("_configure(int seed, bool cpu_tensors_are_host, int optin_smem_bytes) -> ()", &configure);
  m.def("_launches() -> str", &launches);
}
