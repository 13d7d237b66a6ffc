// Shared by lis_matmul.cpp (LIS from float scores) and int_attention.cpp (LIS from score codes):
// Log-Int-Softmax and attn@V for the rows of one (batch, head), given each score's gap d to
// its row's largest score as an index into the head's table of integer exps.
#pragma once

#include <cstdint>
#include <vector>

namespace fxquant_lis {

// d_index: rows x cols (d clamped to the table's last entry; d_index[i * cols] < 0 marks a row
// of non-finite scores: NaN outputs). vd: cols x vdim float64 (v - zv). out: rows of vdim
// float32, row stride out_stride. powers / acc: scratch.
void lis_rows(const int32_t* d_index, int64_t rows, int64_t cols, const double* table, int64_t qmax,
              int64_t max_shift, bool renormalize, const double* vd, int64_t vdim, const double* v_scale,
              float* out, int64_t out_stride, std::vector<double>& powers, std::vector<double>& acc);

// V codes (int8, or uint8 when is_uint8) of one (batch, head) starting at base -> vd (cols x vdim
// float64, code - zero[c]).
void load_v(const uint8_t* base, bool is_uint8, int64_t row_stride, int64_t col_stride, int64_t cols, int64_t vdim,
            const double* zero, double* vd);

}  // namespace fxquant_lis
