// fastpref._C: the Python module object. The ops themselves register through the torch dispatcher
// (TORCH_LIBRARY_FRAGMENT / TORCH_LIBRARY_IMPL in the other files of csrc/) and appear as torch.ops.fastpref.*
// as soon as this module is imported.
#include <torch/extension.h>

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
}
