// fxquant::lis_shift_matmul: Log-Int-Softmax and attn@V (LisShiftMatmul) as one CPU kernel.
//
// The torch reference (fxquant/runtime/log_int_softmax.py) computes, per row of scores:
//   x      = round(scores / s) - max            (float64 holding integers)
//   e      = i_exp(x)                           integer exp (I-BERT), a function of d = max - x only
//   total  = sum(e)
//   m      = nearest_power_code(total, e)       log2 code of e / total, by comparisons
//   P      = 2**(T - m) where m <= T and m < qmax, else 0
//   out    = (P @ (v - zv)) * sv / sum(P)       float64 matmul of exact integers, then float32
// Here e comes from a per-head table of i_exp over d (built in Python by the reference's own
// i_exp: the same numbers), total is summed exactly in int64, m is found from the exponent
// bits of total and e (no log2, no division) with the reference's float64 rounding test, and
// P @ (v - zv) is one float64 GEMM per (batch, head): every product and partial sum is an
// integer below 2**53 (LisShiftMatmul's max_shift guarantees it), so the GEMM is exact in any
// order, as the reference's matmul is. The outputs equal the reference's bit for bit, except
// that the reference sums e in float64 in torch's order: above 2**53 that sum can round,
// which could move m only where total / e sits on a rounding boundary to within 2**-52.
//
// A row holding a NaN or an infinity gives NaN outputs (the integer graph's non-finite guard
// makes such a sample NaN in every output anyway).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "lis_rows.h"

#if defined(__AVX512F__) && defined(__AVX512DQ__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

inline uint64_t bits_of(double x) {
  uint64_t b;
  std::memcpy(&b, &x, sizeof b);
  return b;
}

inline double pow2(int64_t n) {  // 2**n for -1022 <= n <= 1023
  const uint64_t b = static_cast<uint64_t>(n + 1023) << 52;
  double d;
  std::memcpy(&d, &b, sizeof d);
  return d;
}

constexpr uint64_t kMantissa = (uint64_t{1} << 52) - 1;

// nearest_power_code(total, e) for normal doubles 1 <= e <= total, as used in lis_rows: k with
// 2**k e <= total < 2**(k+1) e from the exponents and mantissas, then k + 1 where
// total**2 >= 2**(2k+1) e**2, compared in float64 as the reference does (its products round the
// same way: 2**(2k+1) e e is 2**(2k+1) times the rounded e**2).

struct VCodes {
  const uint8_t* data;
  bool is_uint8;
  int64_t s0, s1, s2, s3;
  explicit VCodes(const at::Tensor& t)
      : data(static_cast<const uint8_t*>(t.data_ptr())), is_uint8(t.scalar_type() == at::kByte),
        s0(t.stride(0)), s1(t.stride(1)), s2(t.stride(2)), s3(t.stride(3)) {}
};

}  // namespace

namespace fxquant_lis {

// 2**(T - m) for the log2 code m of e / total (nearest_power_code, then LisShiftMatmul's
// mask: m = qmax where e is 0, 0 where m > T or m = qmax); scalar form of powers_avx512.
inline int64_t power_of(double e, double total, int64_t qmax, int64_t max_shift) {
  const double ec = e < 1.0 ? 1.0 : e;
  const uint64_t bt = bits_of(total), be = bits_of(ec);
  const int64_t k = static_cast<int64_t>(bt >> 52) - static_cast<int64_t>(be >> 52) -
                    static_cast<int64_t>((bt & kMantissa) < (be & kMantissa));
  int64_t m = total * total >= (ec * ec) * pow2(2 * k + 1) ? k + 1 : k;
  m = e > 0.0 ? m : qmax;
  m = m < 0 ? 0 : (m > qmax ? qmax : m);
  return (m <= max_shift && m < qmax) ? (int64_t{1} << (max_shift - m)) : 0;
}

#if defined(__AVX512F__) && defined(__AVX512DQ__)
// power_of for 8 keys at a time while 8 remain; returns how many keys it did.
inline int64_t powers_avx512(const int32_t* d, int64_t cols, const double* table, double total, int64_t qmax,
                             int64_t max_shift, double* p, int64_t& sum) {
  const uint64_t bt = bits_of(total);
  const __m512i exp_t = _mm512_set1_epi64(static_cast<int64_t>(bt >> 52));
  const __m512i man_t = _mm512_set1_epi64(static_cast<int64_t>(bt & kMantissa));
  const __m512i mant = _mm512_set1_epi64(static_cast<int64_t>(kMantissa)), one_i = _mm512_set1_epi64(1);
  const __m512i qmax_v = _mm512_set1_epi64(qmax), shift_v = _mm512_set1_epi64(max_shift), zero_i = _mm512_setzero_si512();
  const __m512i bias = _mm512_set1_epi64(1024);  // 2k + 1 + 1023
  const __m512d one = _mm512_set1_pd(1.0), zero = _mm512_setzero_pd(), total_sq = _mm512_set1_pd(total * total);
  __m512i acc = _mm512_setzero_si512();
  int64_t j = 0;
  for (; j + 8 <= cols; j += 8) {
    const __m256i idx = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(d + j));
    const __m512d e = _mm512_i32gather_pd(idx, table, 8);
    const __m512d ec = _mm512_max_pd(e, one);  // e >= 0: max(e, 1) is e.clamp_min(1)
    const __m512i be = _mm512_castpd_si512(ec);
    __m512i k = _mm512_sub_epi64(exp_t, _mm512_srli_epi64(be, 52));
    k = _mm512_mask_sub_epi64(k, _mm512_cmplt_epu64_mask(man_t, _mm512_and_si512(be, mant)), k, one_i);
    const __m512d power2 = _mm512_castsi512_pd(_mm512_slli_epi64(_mm512_add_epi64(_mm512_add_epi64(k, k), bias), 52));
    const __m512d rhs = _mm512_mul_pd(_mm512_mul_pd(ec, ec), power2);
    __m512i m = _mm512_mask_add_epi64(k, _mm512_cmp_pd_mask(total_sq, rhs, _CMP_GE_OQ), k, one_i);
    m = _mm512_mask_blend_epi64(_mm512_cmp_pd_mask(e, zero, _CMP_GT_OQ), qmax_v, m);
    m = _mm512_min_epi64(_mm512_max_epi64(m, zero_i), qmax_v);
    const __mmask8 kept = _mm512_cmple_epi64_mask(m, shift_v) & _mm512_cmplt_epi64_mask(m, qmax_v);
    const __m512i power = _mm512_maskz_sllv_epi64(kept, one_i, _mm512_sub_epi64(shift_v, m));
    _mm512_storeu_pd(p + j, _mm512_cvtepi64_pd(power));
    acc = _mm512_add_epi64(acc, power);
  }
  sum += _mm512_reduce_add_epi64(acc);
  return j;
}
#endif

// x = round(score / grid) (half to even, as torch.round on float64) and d = min(max(x) - x, last)
// for one row of scores; false when the row holds a NaN or an infinity.
inline bool score_gaps(const float* row, int64_t cols, int64_t stride, double grid, double last, double* x,
                       int32_t* d) {
  double top = -std::numeric_limits<double>::infinity();
  bool finite = true;
  int64_t j = 0;
#if defined(__AVX512F__) && defined(__AVX512DQ__)
  if (stride == 1) {
    const __m512d grid_v = _mm512_set1_pd(grid), huge = _mm512_set1_pd(std::numeric_limits<double>::max());
    const __m512d sign = _mm512_castsi512_pd(_mm512_set1_epi64(0x7fffffffffffffffLL));
    __m512d top_v = _mm512_set1_pd(-std::numeric_limits<double>::infinity());
    __mmask8 ok = 0xff;
    for (; j + 8 <= cols; j += 8) {
      const __m512d value = _mm512_cvtps_pd(_mm256_loadu_ps(row + j));
      ok &= _mm512_cmp_pd_mask(_mm512_and_pd(value, sign), huge, _CMP_LE_OQ);
      const __m512d rounded = _mm512_roundscale_pd(_mm512_div_pd(value, grid_v), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      _mm512_storeu_pd(x + j, rounded);
      top_v = _mm512_max_pd(top_v, rounded);
    }
    finite = ok == 0xff;
    top = _mm512_reduce_max_pd(top_v);
  }
#endif
  for (; j < cols; ++j) {
    const double value = static_cast<double>(row[j * stride]);
    finite = finite && std::fabs(value) <= std::numeric_limits<double>::max();
    x[j] = std::nearbyint(value / grid);
    top = x[j] > top ? x[j] : top;
  }
  if (!finite) {
    return false;
  }
  for (int64_t i = 0; i < cols; ++i) {  // vectorizes: min and a conversion
    const double gap = top - x[i];
    d[i] = static_cast<int32_t>(gap < last ? gap : last);
  }
  return true;
}

// One (batch, head): rows of table indices (d clamped to the table) -> out rows (float32,
// row stride out_stride). d_index is rows x cols; a negative entry marks a non-finite row
// (its first element only).
void lis_rows(const int32_t* d_index, int64_t rows, int64_t cols, const double* table, int64_t qmax,
              int64_t max_shift, bool renormalize, const double* vd, int64_t vdim, const double* v_scale,
              float* out, int64_t out_stride, std::vector<double>& powers, std::vector<double>& acc) {
  powers.resize(rows * cols);
  acc.resize(rows * vdim);
  std::vector<double> row_sum(rows);
  std::vector<char> bad(rows);
  for (int64_t i = 0; i < rows; ++i) {
    const int32_t* d = d_index + i * cols;
    double* p = powers.data() + i * cols;
    if (cols > 0 && d[0] < 0) {
      bad[i] = 1;
      std::fill(p, p + cols, 0.0);
      continue;
    }
    int64_t total_int = 0, t = 0;
#if defined(__AVX512F__) && defined(__AVX512DQ__)
    {
      __m512i sum8 = _mm512_setzero_si512();
      for (; t + 8 <= cols; t += 8) {
        const __m256i idx = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(d + t));
        sum8 = _mm512_add_epi64(sum8, _mm512_cvttpd_epi64(_mm512_i32gather_pd(idx, table, 8)));
      }
      total_int = _mm512_reduce_add_epi64(sum8);
    }
#endif
    for (; t < cols; ++t) {
      total_int += static_cast<int64_t>(table[d[t]]);
    }
    const double total = static_cast<double>(total_int);
    int64_t sum = 0;  // exact: the powers are integers, their sum below 2**53
    int64_t j = 0;
#if defined(__AVX512F__) && defined(__AVX512DQ__)
    j = powers_avx512(d, cols, table, total, qmax, max_shift, p, sum);
#endif
    for (; j < cols; ++j) {
      const int64_t power = power_of(table[d[j]], total, qmax, max_shift);
      p[j] = static_cast<double>(power);
      sum += power;
    }
    row_sum[i] = static_cast<double>(sum);
  }
  if (cols > 0 && vdim > 0) {  // acc (rows x vdim) = powers (rows x cols) @ vd (cols x vdim): torch's dgemm
    const auto f64 = at::TensorOptions().dtype(at::kDouble);
    at::Tensor acc_t = at::from_blob(acc.data(), {rows, vdim}, f64);
    at::mm_out(acc_t, at::from_blob(powers.data(), {rows, cols}, f64),
               at::from_blob(const_cast<double*>(vd), {cols, vdim}, f64));
  } else {
    std::fill(acc.begin(), acc.end(), 0.0);
  }
  const double unit = pow2(-max_shift);
  for (int64_t i = 0; i < rows; ++i) {
    float* o = out + i * out_stride;
    const double* a = acc.data() + i * vdim;
    if (bad[i]) {
      std::fill(o, o + vdim, std::numeric_limits<float>::quiet_NaN());
    } else if (renormalize) {
      for (int64_t c = 0; c < vdim; ++c) {
        o[c] = static_cast<float>(a[c] * v_scale[c] / row_sum[i]);
      }
    } else {
      for (int64_t c = 0; c < vdim; ++c) {
        o[c] = static_cast<float>(a[c] * (v_scale[c] * unit));
      }
    }
  }
}

void load_v(const uint8_t* base, bool is_uint8, int64_t row_stride, int64_t col_stride, int64_t cols, int64_t vdim,
            const double* zero, double* vd) {
  for (int64_t j = 0; j < cols; ++j) {
    const uint8_t* row = base + j * row_stride;
    for (int64_t c = 0; c < vdim; ++c) {
      const uint8_t raw = row[c * col_stride];
      const double code = is_uint8 ? static_cast<double>(raw) : static_cast<double>(static_cast<int8_t>(raw));
      vd[j * vdim + c] = code - zero[c];
    }
  }
}

}  // namespace fxquant_lis

namespace {

void check_common(const at::Tensor& v, const at::Tensor& table, const at::Tensor& v_scale, const at::Tensor& v_zero,
                  int64_t heads, int64_t bits, int64_t max_shift) {
  TORCH_CHECK(v.device().is_cpu() && v.dim() == 4, "fxquant::lis_shift_matmul: v must be a 4-d CPU tensor");
  TORCH_CHECK(v.scalar_type() == at::kChar || v.scalar_type() == at::kByte,
              "fxquant::lis_shift_matmul: v must hold int8 or uint8 codes, got ", v.scalar_type());
  TORCH_CHECK(table.scalar_type() == at::kDouble && table.dim() == 2 && table.size(0) == heads && table.size(1) >= 1,
              "fxquant::lis_shift_matmul: exp table must be float64 (H, D), got ", table.sizes());
  TORCH_CHECK(table.size(1) < (int64_t{1} << 30), "fxquant::lis_shift_matmul: exp table too long");
  const int64_t vdim = v.size(3);
  for (const at::Tensor* t : {&v_scale, &v_zero}) {
    TORCH_CHECK(t->scalar_type() == at::kDouble && t->dim() == 2 && t->size(0) == heads && t->size(1) == vdim,
                "fxquant::lis_shift_matmul: V scale and zero point must be float64 (H, Dv), got ", t->sizes());
  }
  TORCH_CHECK(bits >= 2 && bits <= 16, "fxquant::lis_shift_matmul: bits must be 2..16");
  TORCH_CHECK(max_shift >= 0 && max_shift <= 62, "fxquant::lis_shift_matmul: max_shift must be 0..62");
}

at::Tensor lis_shift_matmul(const at::Tensor& scores, const at::Tensor& v, const at::Tensor& grid,
                            const at::Tensor& table, const at::Tensor& v_scale, const at::Tensor& v_zero, int64_t bits,
                            int64_t max_shift, bool renormalize) {
  TORCH_CHECK(scores.device().is_cpu() && scores.dim() == 4 && scores.scalar_type() == at::kFloat,
              "fxquant::lis_shift_matmul: scores must be a 4-d float32 CPU tensor");
  const int64_t batch = scores.size(0), heads = scores.size(1), rows = scores.size(2), cols = scores.size(3);
  check_common(v, table, v_scale, v_zero, heads, bits, max_shift);
  TORCH_CHECK(v.size(0) == batch && v.size(1) == heads && v.size(2) == cols,
              "fxquant::lis_shift_matmul: v must be (B, H, M, Dv) with the scores' B, H, M; got scores ",
              scores.sizes(), ", v ", v.sizes());
  TORCH_CHECK(grid.scalar_type() == at::kDouble && grid.dim() == 1 && grid.size(0) == heads,
              "fxquant::lis_shift_matmul: grid must be float64 (H,)");
  const int64_t vdim = v.size(3), levels = table.size(1), qmax = (int64_t{1} << bits) - 1;
  at::Tensor out = at::empty({batch, heads, rows, vdim}, scores.options());
  if (out.numel() == 0) {
    return out;
  }
  const at::Tensor tab = table.contiguous(), vs = v_scale.contiguous(), vz = v_zero.contiguous(),
                   g = grid.contiguous();
  const double *tp = tab.data_ptr<double>(), *vsp = vs.data_ptr<double>(), *vzp = vz.data_ptr<double>(),
               *gp = g.data_ptr<double>();
  const float* sp = scores.data_ptr<float>();
  const int64_t s0 = scores.stride(0), s1 = scores.stride(1), s2 = scores.stride(2), s3 = scores.stride(3);
  float* op = out.data_ptr<float>();
  const VCodes vc(v);
  const double largest = tab.numel() ? tab.max().item<double>() : 0.0;
  TORCH_CHECK(largest >= 0.0 && largest < 9007199254740992.0 && largest * static_cast<double>(cols) < 4.6e18,
              "fxquant::lis_shift_matmul: exp table values times ", cols, " keys overflow the int64 row totals");
  const double last = static_cast<double>(levels - 1);
  at::parallel_for(0, batch * heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<int32_t> d_index(rows * cols);
    std::vector<double> x(cols), vd(cols * vdim), powers, acc;
    for (int64_t pair = begin; pair < end; ++pair) {
      const int64_t b = pair / heads, h = pair % heads;
      const double grid_h = gp[h];
      for (int64_t i = 0; i < rows; ++i) {
        const float* row = sp + b * s0 + h * s1 + i * s2;
        int32_t* d = d_index.data() + i * cols;
        if (!fxquant_lis::score_gaps(row, cols, s3, grid_h, last, x.data(), d)) {
          d[0] = -1;
        }
      }
      fxquant_lis::load_v(vc.data + b * vc.s0 + h * vc.s1, vc.is_uint8, vc.s2, vc.s3, cols, vdim, vzp + h * vdim,
                          vd.data());
      fxquant_lis::lis_rows(d_index.data(), rows, cols, tp + h * levels, qmax, max_shift, renormalize, vd.data(), vdim,
                            vsp + h * vdim, op + (b * heads + h) * rows * vdim, vdim, powers, acc);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fxquant_kernels, m) {
  m.def(
      "lis_shift_matmul(Tensor scores, Tensor v, Tensor grid, Tensor table, Tensor v_scale, Tensor v_zero, int bits, "
      "int max_shift, bool renormalize) -> Tensor");
}

TORCH_LIBRARY_IMPL(fxquant_kernels, CPU, m) {
  m.impl("lis_shift_matmul", &lis_shift_matmul);
}
