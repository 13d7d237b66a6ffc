// fxquant::int_attention: the integer graph's attention core as one CPU kernel.
//
//   scores codes = clamp(round((q - zq) @ (k - zk)^T * M) + zs, qmin, qmax)   exact int32 GEMM
//   x            = codes * A + B                                               (dequantize)
//   out          = softmax(x, -1) @ ((v - zv) * sv)                            float32
//
// which is what IntMatmul (float requantization), DequantizeCodes (one multiply-add),
// softmax and the float attn@V matmul of fxquant's integer graph compute one after the
// other. Here each (batch, head) is one task (split into blocks of query rows when there
// are fewer than about 4 per thread): its scores stay in the cache instead of
// travelling through memory as a (B, H, N, M) tensor, q @ k^T runs as int8 x int8 -> int32
// (torch._int_mm: oneDNN, VNNI where the CPU has it), and the softmax needs no exp per
// element: the scores are codes, so exp(x_j - x_max) = exp(-A (c_max - c_j)) is one of
// qmax - qmin + 1 values per head, looked up in a table.
//
// Inputs: q (B, H, N, D), kt (B, H, D, M), v (B, H, M, Dv): int8 or uint8 codes, any
// strides. consts (H, 8) float32 per head: zq, zk, M, zs, A, B, sv, zv, zero points in the
// domain of the codes they apply to (uint8 codes: int8 zero point + 128).
// Output: float32 (B, N, H, Dv), contiguous (the layout the projection after attention reads).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <torch/library.h>

#include "lis_rows.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

constexpr int64_t kConsts = 8;
constexpr int64_t kLanes = 16;

// One code tensor read as int8 (uint8 codes: u - 128 = u ^ 0x80, the same values with the
// zero point moved by 128), so that torch._int_mm can take it.
struct Codes {
  const uint8_t* data;
  bool is_uint8;
  int64_t s0, s1, s2, s3;

  explicit Codes(const at::Tensor& t)
      : data(static_cast<const uint8_t*>(t.data_ptr())), is_uint8(t.scalar_type() == at::kByte),
        s0(t.stride(0)), s1(t.stride(1)), s2(t.stride(2)), s3(t.stride(3)) {}

  const uint8_t* at(int64_t b, int64_t h, int64_t i, int64_t j) const {
    return data + b * s0 + h * s1 + i * s2 + j * s3;
  }
  int64_t int8_zero_point(float zero_point) const {
    return static_cast<int64_t>(zero_point) - (is_uint8 ? 128 : 0);
  }
};

// n codes at src (element stride `stride`) to int8 at dst; returns their sum.
inline int32_t load_int8(const uint8_t* src, int64_t n, int64_t stride, bool is_uint8, int8_t* dst) {
  const uint8_t flip = is_uint8 ? 0x80 : 0x00;
  int32_t sum = 0;
  if (stride == 1) {  // the usual case: vectorizes
    for (int64_t i = 0; i < n; ++i) {
      dst[i] = static_cast<int8_t>(src[i] ^ flip);
      sum += dst[i];
    }
  } else {
    for (int64_t i = 0; i < n; ++i) {
      dst[i] = static_cast<int8_t>(src[i * stride] ^ flip);
      sum += dst[i];
    }
  }
  return sum;
}

// n codes at src to float (codes - zero_point) * scale: dequantize_codes' arithmetic.
inline void load_float(const uint8_t* src, int64_t n, int64_t stride, bool is_uint8, float zero_point, float scale,
                       float* dst) {
  for (int64_t i = 0; i < n; ++i) {
    const uint8_t raw = src[i * stride];
    const float code = is_uint8 ? static_cast<float>(raw) : static_cast<float>(static_cast<int8_t>(raw));
    dst[i] = (code - zero_point) * scale;
  }
}

void check_codes(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "fxquant::int_attention: ", name, " must be a CPU tensor");
  TORCH_CHECK(t.dim() == 4, "fxquant::int_attention: ", name, " must be 4-d (batch, head, rows, cols), got ",
              t.dim(), "-d");
  TORCH_CHECK(t.scalar_type() == at::kChar || t.scalar_type() == at::kByte, "fxquant::int_attention: ", name,
              " must hold int8 or uint8 codes, got ", t.scalar_type());
}

at::Tensor int_attention(const at::Tensor& q, const at::Tensor& kt, const at::Tensor& v, const at::Tensor& consts,
                         int64_t qmin, int64_t qmax) {
  check_codes(q, "q");
  check_codes(kt, "kt");
  check_codes(v, "v");
  const int64_t batch = q.size(0), heads = q.size(1), rows = q.size(2), depth = q.size(3);
  const int64_t cols = kt.size(3), vdim = v.size(3);
  TORCH_CHECK(kt.size(0) == batch && kt.size(1) == heads && kt.size(2) == depth,
              "fxquant::int_attention: kt must be (B, H, D, M) with q's B, H, D; got q ", q.sizes(), ", kt ",
              kt.sizes());
  TORCH_CHECK(v.size(0) == batch && v.size(1) == heads && v.size(2) == cols,
              "fxquant::int_attention: v must be (B, H, M, Dv) with kt's M; got kt ", kt.sizes(), ", v ", v.sizes());
  TORCH_CHECK(consts.scalar_type() == at::kFloat && consts.dim() == 2 && consts.size(0) == heads &&
                  consts.size(1) == kConsts,
              "fxquant::int_attention: consts must be float32 (H, 8), got ", consts.sizes());
  TORCH_CHECK(qmin < qmax && qmax - qmin < 65536, "fxquant::int_attention: bad score code range");
  // every int32 term below (raw products, zero-point terms, their sum) stays under 2**31
  TORCH_CHECK(depth <= 32768, "fxquant::int_attention: head dimension ", depth, " is above 32768");

  const at::Tensor c = consts.contiguous();
  const float* cp = c.data_ptr<float>();
  const int64_t levels = qmax - qmin + 1;
  std::vector<float> table(heads * levels);  // exp(-A d) for d = c_max - c_j
  for (int64_t h = 0; h < heads; ++h) {
    const float scale = cp[h * kConsts + 4];
    TORCH_CHECK(scale >= 0.f, "fxquant::int_attention: head ", h, " has a negative score scale");
    for (int64_t d = 0; d < levels; ++d) {
      table[h * levels + d] = std::exp(-scale * static_cast<float>(d));
    }
  }

  at::Tensor out = at::empty({batch, rows, heads, vdim}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) {  // no batch, head, row or value column: nothing to compute
    return out;
  }
  if (cols == 0) {  // no keys: the softmax over nothing times nothing, as torch.matmul of empty operands gives
    return out.zero_();
  }
  float* out_p = out.data_ptr<float>();
  const Codes qc(q), kc(kt), vc(v);

  // Tasks: (batch, head) pairs, split into row blocks when there are few pairs for the
  // threads (batch 1 on a many-core machine), so that every thread gets about 4 tasks.
  const int64_t pairs = batch * heads, threads = at::get_num_threads();
  int64_t blocks = 1;
  if (pairs < 4 * threads) {
    blocks = std::max<int64_t>(1, std::min<int64_t>((rows + 31) / 32, (4 * threads + pairs - 1) / pairs));
  }
  const int64_t block_rows = (rows + blocks - 1) / blocks;

  at::parallel_for(0, pairs * blocks, 1, [&](int64_t begin, int64_t end) {
    at::Tensor a8 = at::empty({block_rows, depth}, q.options().dtype(at::kChar));
    at::Tensor b8 = at::empty({cols, depth}, q.options().dtype(at::kChar));
    at::Tensor acc = at::empty({block_rows, cols}, q.options().dtype(at::kInt));
    std::vector<int32_t> row_sum(block_rows), col_term(cols), codes(cols);
    std::vector<float> probs(block_rows * cols), vf(cols * vdim);
    int8_t* a = a8.data_ptr<int8_t>();
    int8_t* bt = b8.data_ptr<int8_t>();
    const int32_t* accp = acc.data_ptr<int32_t>();
    for (int64_t task = begin; task < end; ++task) {
      const int64_t pair = task / blocks, b = pair / heads, h = pair % heads;
      const int64_t first = (task % blocks) * block_rows, count = std::min(block_rows, rows - first);
      if (count <= 0) {
        continue;
      }
      const float* k = cp + h * kConsts;
      const int64_t zq = qc.int8_zero_point(k[0]), zk = kc.int8_zero_point(k[1]);
      const float multiplier = k[2], zs = k[3], sv = k[6], zv = k[7];
      const float lo = static_cast<float>(qmin), hi = static_cast<float>(qmax);
      for (int64_t i = 0; i < count; ++i) {
        row_sum[i] = load_int8(qc.at(b, h, first + i, 0), depth, qc.s3, qc.is_uint8, a + i * depth);
      }
      for (int64_t j = 0; j < cols; ++j) {  // kt's column j is k's row j
        col_term[j] = static_cast<int32_t>(zq * load_int8(kc.at(b, h, 0, j), depth, kc.s2, kc.is_uint8,
                                                          bt + j * depth));
      }
      if (depth == 0) {  // empty dot products
        acc.zero_();
      } else if (depth > 1) {
        at::Tensor acc_rows = acc.narrow(0, 0, count);  // leading rows of contiguous buffers: still contiguous
        at::_int_mm_out(acc_rows, a8.narrow(0, 0, count), b8.t());
      } else {  // a (K = 1) view is ambiguous column-/row-major for the GEMM: the outer product by hand
        int32_t* out_acc = acc.data_ptr<int32_t>();
        for (int64_t i = 0; i < count; ++i) {
          for (int64_t j = 0; j < cols; ++j) {
            out_acc[i * cols + j] = static_cast<int32_t>(a[i]) * static_cast<int32_t>(bt[j]);
          }
        }
      }
      const int32_t constant = static_cast<int32_t>(depth * zq * zk);
      const float* tab = table.data() + h * levels;
      for (int64_t i = 0; i < count; ++i) {
        const int32_t row_term = static_cast<int32_t>(zk * row_sum[i]) - constant;
        const int32_t* acc_row = accp + i * cols;
        int32_t* code = codes.data();
        int32_t top = static_cast<int32_t>(qmin);
        for (int64_t j = 0; j < cols; ++j) {  // written to vectorize: no calls, selects instead of branches
          const float exact = static_cast<float>(acc_row[j] - row_term - col_term[j]);
          float y = std::rint(exact * multiplier) + zs;  // round half to even, as torch.round
          y = y < lo ? lo : y;
          y = y > hi ? hi : y;
          code[j] = static_cast<int32_t>(y);
          top = code[j] > top ? code[j] : top;
        }
        float* p = probs.data() + i * cols;
        float lanes[kLanes] = {};
        int64_t j = 0;
        for (; j + kLanes <= cols; j += kLanes) {  // kLanes partial sums: a vectorizable float reduction
          for (int64_t l = 0; l < kLanes; ++l) {
            p[j + l] = tab[top - code[j + l]];
            lanes[l] += p[j + l];
          }
        }
        float total = 0.f;
        for (; j < cols; ++j) {
          p[j] = tab[top - code[j]];
          total += p[j];
        }
        for (int64_t l = 0; l < kLanes; ++l) {
          total += lanes[l];
        }
        const float inv = 1.f / total;
        for (int64_t k2 = 0; k2 < cols; ++k2) {
          p[k2] *= inv;
        }
      }
      for (int64_t j = 0; j < cols; ++j) {
        load_float(vc.at(b, h, j, 0), vdim, vc.s3, vc.is_uint8, zv, sv, vf.data() + j * vdim);
      }
      // out[b, first:first + count, h, :] (row stride heads * vdim) = probs (count x cols) @ vf (cols x vdim)
      at::native::cpublas::brgemm(count, vdim, cols, cols, vdim, heads * vdim, false, probs.data(), vf.data(),
                                  out_p + ((b * rows + first) * heads + h) * vdim, false);
    }
  });
  return out;
}

// fxquant::int_attention_lis: the same q @ kT and score codes, then Log-Int-Softmax and attn@V
// by shifts (LisShiftMatmul) instead of the float softmax: the scores are codes, so each one's
// gap to its row's largest is max(c) - c, the index into the head's table of integer exps
// (lis_rows.h). consts (H, 4) float32: zq, zk, M, zs; table (H, D) float64; v_scale, v_zero
// (H, Dv) float64. Output float32 (B, H, N, Dv), as LisShiftMatmul's.
at::Tensor int_attention_lis(const at::Tensor& q, const at::Tensor& kt, const at::Tensor& v, const at::Tensor& consts,
                             int64_t qmin, int64_t qmax, const at::Tensor& table, const at::Tensor& v_scale,
                             const at::Tensor& v_zero, int64_t bits, int64_t max_shift, bool renormalize) {
  check_codes(q, "q");
  check_codes(kt, "kt");
  check_codes(v, "v");
  const int64_t batch = q.size(0), heads = q.size(1), rows = q.size(2), depth = q.size(3);
  const int64_t cols = kt.size(3), vdim = v.size(3);
  TORCH_CHECK(kt.size(0) == batch && kt.size(1) == heads && kt.size(2) == depth,
              "fxquant::int_attention_lis: kt must be (B, H, D, M) with q's B, H, D; got q ", q.sizes(), ", kt ",
              kt.sizes());
  TORCH_CHECK(v.size(0) == batch && v.size(1) == heads && v.size(2) == cols,
              "fxquant::int_attention_lis: v must be (B, H, M, Dv) with kt's M; got kt ", kt.sizes(), ", v ",
              v.sizes());
  TORCH_CHECK(consts.scalar_type() == at::kFloat && consts.dim() == 2 && consts.size(0) == heads &&
                  consts.size(1) == 4,
              "fxquant::int_attention_lis: consts must be float32 (H, 4), got ", consts.sizes());
  TORCH_CHECK(qmin < qmax && qmax - qmin < 65536, "fxquant::int_attention_lis: bad score code range");
  TORCH_CHECK(depth <= 32768, "fxquant::int_attention_lis: head dimension ", depth, " is above 32768");
  TORCH_CHECK(table.scalar_type() == at::kDouble && table.dim() == 2 && table.size(0) == heads && table.size(1) >= 1,
              "fxquant::int_attention_lis: exp table must be float64 (H, D), got ", table.sizes());
  for (const at::Tensor* t : {&v_scale, &v_zero}) {
    TORCH_CHECK(t->scalar_type() == at::kDouble && t->dim() == 2 && t->size(0) == heads && t->size(1) == vdim,
                "fxquant::int_attention_lis: V scale and zero point must be float64 (H, Dv), got ", t->sizes());
  }
  TORCH_CHECK(bits >= 2 && bits <= 16 && max_shift >= 0 && max_shift <= 62,
              "fxquant::int_attention_lis: bits must be 2..16 and max_shift 0..62");
  const at::Tensor c = consts.contiguous(), tab = table.contiguous(), vs = v_scale.contiguous(),
                   vz = v_zero.contiguous();
  const double largest = tab.max().item<double>();
  TORCH_CHECK(largest >= 0.0 && largest < 9007199254740992.0 && largest * static_cast<double>(cols) < 4.6e18,
              "fxquant::int_attention_lis: exp table values times ", cols, " keys overflow the int64 row totals");
  const float* cp = c.data_ptr<float>();
  const double *tp = tab.data_ptr<double>(), *vsp = vs.data_ptr<double>(), *vzp = vz.data_ptr<double>();
  const int64_t levels = tab.size(1), lis_qmax = (int64_t{1} << bits) - 1;
  at::Tensor out = at::empty({batch, heads, rows, vdim}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) {
    return out;
  }
  float* out_p = out.data_ptr<float>();
  const Codes qc(q), kc(kt), vc(v);
  const int64_t pairs = batch * heads, threads = at::get_num_threads();
  int64_t blocks = 1;
  if (pairs < 4 * threads) {
    blocks = std::max<int64_t>(1, std::min<int64_t>((rows + 31) / 32, (4 * threads + pairs - 1) / pairs));
  }
  const int64_t block_rows = (rows + blocks - 1) / blocks;
  at::parallel_for(0, pairs * blocks, 1, [&](int64_t begin, int64_t end) {
    at::Tensor a8 = at::empty({block_rows, depth}, q.options().dtype(at::kChar));
    at::Tensor b8 = at::empty({cols, depth}, q.options().dtype(at::kChar));
    at::Tensor acc = at::empty({block_rows, cols}, q.options().dtype(at::kInt));
    std::vector<int32_t> row_sum(block_rows), col_term(cols), codes(cols), d_index(block_rows * cols);
    std::vector<double> vd(cols * vdim), powers, lis_acc;
    int8_t* a = a8.data_ptr<int8_t>();
    int8_t* bt = b8.data_ptr<int8_t>();
    const int32_t* accp = acc.data_ptr<int32_t>();
    for (int64_t task = begin; task < end; ++task) {
      const int64_t pair = task / blocks, b = pair / heads, h = pair % heads;
      const int64_t first = (task % blocks) * block_rows, count = std::min(block_rows, rows - first);
      if (count <= 0) {
        continue;
      }
      const float* k = cp + h * 4;
      const int64_t zq = qc.int8_zero_point(k[0]), zk = kc.int8_zero_point(k[1]);
      const float multiplier = k[2], zs = k[3];
      const float lo = static_cast<float>(qmin), hi = static_cast<float>(qmax);
      for (int64_t i = 0; i < count; ++i) {
        row_sum[i] = load_int8(qc.at(b, h, first + i, 0), depth, qc.s3, qc.is_uint8, a + i * depth);
      }
      for (int64_t j = 0; j < cols; ++j) {
        col_term[j] = static_cast<int32_t>(zq * load_int8(kc.at(b, h, 0, j), depth, kc.s2, kc.is_uint8,
                                                          bt + j * depth));
      }
      if (depth == 0) {
        acc.zero_();
      } else if (depth > 1) {
        at::Tensor acc_rows = acc.narrow(0, 0, count);
        at::_int_mm_out(acc_rows, a8.narrow(0, 0, count), b8.t());
      } else {
        int32_t* out_acc = acc.data_ptr<int32_t>();
        for (int64_t i = 0; i < count; ++i) {
          for (int64_t j = 0; j < cols; ++j) {
            out_acc[i * cols + j] = static_cast<int32_t>(a[i]) * static_cast<int32_t>(bt[j]);
          }
        }
      }
      const int32_t constant = static_cast<int32_t>(depth * zq * zk);
      for (int64_t i = 0; i < count; ++i) {
        const int32_t row_term = static_cast<int32_t>(zk * row_sum[i]) - constant;
        const int32_t* acc_row = accp + i * cols;
        int32_t* code = codes.data();
        int32_t top = static_cast<int32_t>(qmin);
        for (int64_t j = 0; j < cols; ++j) {  // the score codes, as int_attention computes them
          const float exact = static_cast<float>(acc_row[j] - row_term - col_term[j]);
          float y = std::rint(exact * multiplier) + zs;
          y = y < lo ? lo : y;
          y = y > hi ? hi : y;
          code[j] = static_cast<int32_t>(y);
          top = code[j] > top ? code[j] : top;
        }
        int32_t* d = d_index.data() + i * cols;
        const int32_t last = static_cast<int32_t>(levels - 1);
        for (int64_t j = 0; j < cols; ++j) {
          const int32_t gap = top - code[j];
          d[j] = gap < last ? gap : last;
        }
      }
      fxquant_lis::load_v(vc.at(b, h, 0, 0), vc.is_uint8, vc.s2, vc.s3, cols, vdim, vzp + h * vdim, vd.data());
      fxquant_lis::lis_rows(d_index.data(), count, cols, tp + h * levels, lis_qmax, max_shift, renormalize, vd.data(),
                            vdim, vsp + h * vdim, out_p + ((b * heads + h) * rows + first) * vdim, vdim, powers,
                            lis_acc);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(fxquant_kernels, m) {
  m.def("int_attention(Tensor q, Tensor kt, Tensor v, Tensor consts, int qmin, int qmax) -> Tensor");
  m.def(
      "int_attention_lis(Tensor q, Tensor kt, Tensor v, Tensor consts, int qmin, int qmax, Tensor table, "
      "Tensor v_scale, Tensor v_zero, int bits, int max_shift, bool renormalize) -> Tensor");
}

TORCH_LIBRARY_IMPL(fxquant_kernels, CPU, m) {
  m.impl("int_attention", &int_attention);
  m.impl("int_attention_lis", &int_attention_lis);
}
