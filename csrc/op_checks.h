// Argument checks shared by the CPU ops' entry points (TORCH_CHECK messages name the op and the argument).
#pragma once

#include <ATen/ATen.h>

namespace fastpref::cpu {

// t must be a CPU tensor of shape [rows] in dtype `one` or `other`.
inline void check_row_vector(const char* op, const char* name, const at::Tensor& t, int64_t rows,
                             at::ScalarType one, at::ScalarType other) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor");
  TORCH_CHECK(t.dim() == 1 && t.size(0) == rows, op, ": ", name, " must be [N] with N = ", rows, ", got shape ",
              t.sizes());
  TORCH_CHECK(t.scalar_type() == one || t.scalar_type() == other, op, ": ", name, " must be ", one,
              one == other ? "" : " or ", one == other ? "" : c10::toString(other), ", got ", t.scalar_type());
}

}  // namespace fastpref::cpu
