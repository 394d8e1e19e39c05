// fastpref._C: the Python module object. The ops themselves register through the torch dispatcher
// (TORCH_LIBRARY_FRAGMENT / TORCH_LIBRARY_IMPL in the other files of csrc/) and appear as torch.ops.fastpref.*
// as soon as this module is imported.
#include <torch/extension.h>

#include "bf16_gemm_cpu.h"

#ifndef FASTPREF_TORCH_VERSION
#define FASTPREF_TORCH_VERSION "unknown"
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastpref compiled kernels (registered as torch.ops.fastpref.*)";
  // The torch release this binary was compiled against; fastpref._ext refuses to use it under another one.
  m.attr("built_with_torch") = FASTPREF_TORCH_VERSION;
#ifdef _OPENMP
  m.attr("with_openmp") = true;
#else
  m.attr("with_openmp") = false;
#endif
  // Process-wide count of native bf16 GEMMs (bf16_gemm_cpu.h): tests check that bf16 runs natively where the CPU
  // supports it instead of silently upcasting.
  m.def("bf16_gemm_calls", &fastpref::cpu::bf16::gemm_calls);
  m.def("bf16_gemm_supported", &fastpref::cpu::bf16::supported);
}
