// The row kernels (cell_rows.h) built for AVX2 + FMA, in namespace hmlstm::avx2; cell_cpu.cpp calls them
// only where the CPU has both (and HMLSTM_CPU_ISA is not "base"). Only GCC on x86-64 builds them here;
// elsewhere avx2_rows_built() is false and the baseline kernels run.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "cell_common.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define HMLSTM_AVX2_ROWS 1
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define HMLSTM_ROWS_NS avx2
#include "cell_rows.h"
#else
#define HMLSTM_AVX2_ROWS 0
#define HMLSTM_ROWS_NS base
#include "cell_rows.h"
#endif

namespace hmlstm {

// The entry points (declared in cell_cpu.cpp) are inside the target region too, so that the kernels'
// template instances are AVX2 code.
void forward_rows_avx2(const Cell<float>& L, const Rows& rs, const float* preU, const std::vector<int64_t>& mapU,
                       const float* tV, const std::vector<int64_t>& mapV, const float* tW,
                       const std::vector<int64_t>& mapW, float* pre_out, float* h_out, float* c_out, float* z_out) {
  HMLSTM_ROWS_NS::forward_rows<float>(L, rs, preU, mapU, tV, mapV, tW, mapW, pre_out, h_out, c_out, z_out);
}
void forward_rows_avx2(const Cell<double>& L, const Rows& rs, const double* preU, const std::vector<int64_t>& mapU,
                       const double* tV, const std::vector<int64_t>& mapV, const double* tW,
                       const std::vector<int64_t>& mapW, double* pre_out, double* h_out, double* c_out,
                       double* z_out) {
  HMLSTM_ROWS_NS::forward_rows<double>(L, rs, preU, mapU, tV, mapV, tW, mapW, pre_out, h_out, c_out, z_out);
}
void backward_rows_avx2(const Cell<float>& L, const Rows& rs, bool zgrad, const BwdBuffers<float>& o) {
  HMLSTM_ROWS_NS::backward_rows<float>(L, rs, zgrad, o);
}
void backward_rows_avx2(const Cell<double>& L, const Rows& rs, bool zgrad, const BwdBuffers<double>& o) {
  HMLSTM_ROWS_NS::backward_rows<double>(L, rs, zgrad, o);
}

#if HMLSTM_AVX2_ROWS
#pragma GCC pop_options
#endif

bool avx2_rows_built() { return HMLSTM_AVX2_ROWS != 0; }

}  // namespace hmlstm
