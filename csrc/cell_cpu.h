// The per-step CPU kernels that the sequence ops (seq_cpu.cpp) run at every layer-step; defined in cell_cpu.cpp.
#pragma once

#include <ATen/ATen.h>

#include "cell_common.h"

#include <array>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <vector>

namespace hmlstm {

// One layer-step into outputs the caller owns: h_out, c_out (B, H), z_out (B,) (layers with a boundary) and,
// when save, pre (B, G); all contiguous. packed[off + 0..2]: W, U, V in oneDNN's layout, or absent.
void forward_step(const Inputs& in, int64_t boundary_mode, bool recompute, const at::Tensor& slope, bool save,
                  bool dense_copy, const std::vector<std::optional<at::Tensor>>& packed, size_t off,
                  const at::Tensor& h_out, const at::Tensor& c_out, const at::Tensor& z_out, const at::Tensor& pre);

// cell_bwd on checked inputs: the 13 gradients of the schema ((0,) where the mask is off), then ds and ds_copy
// when return_ds. With ds_into (a (B, G) buffer), ds is written there (zero on COPY rows). packed[off + 0..2]:
// the transposes of W, U, V.
std::vector<at::Tensor> backward_step(const Inputs& in, const at::Tensor& grad_h, const at::Tensor& grad_c,
                                      const at::Tensor& grad_z, const at::Tensor& slope, const at::Tensor& pre_,
                                      int64_t boundary_mode, bool recompute, bool dense_copy,
                                      const std::array<bool, 13>& mask, bool return_ds,
                                      const std::vector<std::optional<at::Tensor>>& packed, size_t off, bool poison,
                                      const at::Tensor* ds_into);

}  // namespace hmlstm
