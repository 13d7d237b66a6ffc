// Row-wise and element-wise integer kernels of the integer graph (CPU), one pass over the data:
//
// fxquant::ptf_layernorm: IntLayerNorm, i.e. fxquant.quant.ptf.ptf_layernorm_codes on one row at a
//   time (shift by alpha, exact int64 sums, integer square root, one dyadic multiplier per row
//   and channel); the same integers and the same float64 division and rounding as the torch
//   code, so the output codes are equal.
// fxquant::code_lut: codes -> codes through a 256-entry table (one per channel, or one for all),
//   indexed by the code's byte; an op between two 8-bit points (GELU between the dequantize and
//   quantize of its input and output points) has only 256 possible inputs, so a table built by
//   running the torch ops on those 256 codes gives the same output codes.
#if defined(__AVX512F__) && defined(__AVX512DQ__)
#include <immintrin.h>
#endif

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

inline int64_t isqrt_floor(int64_t n) {  // floor(sqrt(n)), n >= 0 below 2**62
  if (n <= 0) {
    return 0;
  }
  int64_t x = static_cast<int64_t>(std::sqrt(static_cast<double>(n)));
  while (x > 0 && x * x > n) {
    --x;
  }
  while ((x + 1) * (x + 1) <= n) {
    ++x;
  }
  return x;
}

at::Tensor ptf_layernorm(const at::Tensor& codes, const at::Tensor& alpha, int64_t in_zero_point, int64_t eps_int,
                         int64_t sigma_bits, const at::Tensor& weight_units, const at::Tensor& offset,
                         int64_t out_zero_point, int64_t qmin, int64_t qmax, bool out_uint8) {
  TORCH_CHECK(codes.device().is_cpu() && (codes.scalar_type() == at::kChar || codes.scalar_type() == at::kByte),
              "fxquant::ptf_layernorm: codes must be int8 or uint8 CPU codes, got ", codes.scalar_type());
  TORCH_CHECK(codes.dim() >= 1, "fxquant::ptf_layernorm: codes need a channel dimension");
  const int64_t channels = codes.size(-1);
  TORCH_CHECK(alpha.scalar_type() == at::kLong && alpha.dim() == 1 && alpha.size(0) == channels,
              "fxquant::ptf_layernorm: alpha must be int64 (C,)");
  TORCH_CHECK(offset.scalar_type() == at::kLong && offset.dim() == 1 && offset.size(0) == channels,
              "fxquant::ptf_layernorm: offset must be int64 (C,)");
  TORCH_CHECK(weight_units.scalar_type() == at::kDouble && weight_units.dim() == 1 && weight_units.size(0) == channels,
              "fxquant::ptf_layernorm: weight_units must be float64 (C,)");
  TORCH_CHECK(sigma_bits >= 0 && sigma_bits <= 30, "fxquant::ptf_layernorm: sigma_bits must be 0..30");
  const bool in_uint8 = codes.scalar_type() == at::kByte;
  const at::Tensor in = codes.contiguous();
  at::Tensor out = at::empty(codes.sizes(), codes.options().dtype(out_uint8 ? at::kByte : at::kChar));
  const int64_t rows = channels == 0 ? 0 : in.numel() / channels;
  if (rows == 0) {
    return out;
  }
  const at::Tensor a = alpha.contiguous(), o = offset.contiguous(), w = weight_units.contiguous();
  const int64_t *ap = a.data_ptr<int64_t>(), *offp = o.data_ptr<int64_t>();
  const double* wp = w.data_ptr<double>();
  const uint8_t* src = static_cast<const uint8_t*>(in.data_ptr());
  uint8_t* dst = static_cast<uint8_t*>(out.data_ptr());
  const double sigma_scale = static_cast<double>(int64_t{1} << sigma_bits);
  constexpr int64_t kShift = 24;  // fxquant.quant.ptf.DYADIC_SHIFT
  const int64_t half = int64_t{1} << (kShift - 1);
  at::parallel_for(0, rows, 16, [=](int64_t begin, int64_t end) {
    std::vector<int64_t> z(channels);
    for (int64_t r = begin; r < end; ++r) {
      const uint8_t* row = src + r * channels;
      int64_t s1 = 0, s2 = 0;
      for (int64_t c = 0; c < channels; ++c) {
        const int64_t code = in_uint8 ? static_cast<int64_t>(row[c]) : static_cast<int64_t>(static_cast<int8_t>(row[c]));
        const int64_t value = (code - in_zero_point) << ap[c];
        z[c] = value;
        s1 += value;
        s2 += value * value;
      }
      const int64_t var_int = channels * s2 - s1 * s1;
      int64_t sigma = isqrt_floor((var_int << (2 * sigma_bits)) + eps_int);
      sigma = sigma < 1 ? 1 : sigma;
      const double sigma_d = static_cast<double>(sigma);
      uint8_t* orow = dst + r * channels;
      int64_t c = 0;
#if defined(__AVX512F__) && defined(__AVX512DQ__)
      {  // the loop below, 8 channels at a time (the same float64 and int64 operations)
        const __m512d scale_v = _mm512_set1_pd(sigma_scale), sigma_v = _mm512_set1_pd(sigma_d);
        const __m512i count_v = _mm512_set1_epi64(channels), s1_v = _mm512_set1_epi64(s1);
        const __m512i half_v = _mm512_set1_epi64(half), zero_v = _mm512_set1_epi64(out_zero_point);
        const __m512i lo_v = _mm512_set1_epi64(qmin), hi_v = _mm512_set1_epi64(qmax);
        for (; c + 8 <= channels; c += 8) {
          const __m512d ratio = _mm512_div_pd(_mm512_mul_pd(_mm512_loadu_pd(wp + c), scale_v), sigma_v);
          const __m512i mult = _mm512_cvtpd_epi64(_mm512_roundscale_pd(ratio, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
          const __m512i centered = _mm512_sub_epi64(_mm512_mullo_epi64(count_v, _mm512_loadu_si512(z.data() + c)), s1_v);
          const __m512i acc = _mm512_add_epi64(_mm512_mullo_epi64(centered, mult), _mm512_loadu_si512(offp + c));
          __m512i q = _mm512_add_epi64(_mm512_srai_epi64(_mm512_add_epi64(acc, half_v), kShift), zero_v);
          q = _mm512_min_epi64(_mm512_max_epi64(q, lo_v), hi_v);
          _mm_storel_epi64(reinterpret_cast<__m128i*>(orow + c), _mm512_cvtepi64_epi8(q));
        }
      }
#endif
      for (; c < channels; ++c) {
        const int64_t mult = static_cast<int64_t>(std::nearbyint(wp[c] * sigma_scale / sigma_d));  // round half even
        const int64_t acc = (channels * z[c] - s1) * mult + offp[c];
        int64_t q = ((acc + half) >> kShift) + out_zero_point;
        q = q < qmin ? qmin : (q > qmax ? qmax : q);
        orow[c] = static_cast<uint8_t>(q);  // the low byte: int8 or uint8, both in range after the clamp
      }
    }
  });
  return out;
}

at::Tensor code_lut(const at::Tensor& codes, const at::Tensor& table, bool out_uint8) {
  TORCH_CHECK(codes.device().is_cpu() && (codes.scalar_type() == at::kChar || codes.scalar_type() == at::kByte),
              "fxquant::code_lut: codes must be int8 or uint8 CPU codes, got ", codes.scalar_type());
  TORCH_CHECK(table.scalar_type() == at::kByte && table.dim() == 2 && table.size(1) == 256,
              "fxquant::code_lut: table must be uint8 (T, 256), got ", table.sizes());
  const int64_t channels = codes.dim() == 0 ? 1 : codes.size(-1);
  const int64_t tables = table.size(0);
  TORCH_CHECK(tables == 1 || tables == channels, "fxquant::code_lut: ", tables, " tables for ", channels,
              " channels");
  const at::Tensor in = codes.contiguous(), tab = table.contiguous();
  at::Tensor out = at::empty(codes.sizes(), codes.options().dtype(out_uint8 ? at::kByte : at::kChar));
  const int64_t n = in.numel();
  const uint8_t* src = static_cast<const uint8_t*>(in.data_ptr());
  const uint8_t* tp = tab.data_ptr<uint8_t>();
  uint8_t* dst = static_cast<uint8_t*>(out.data_ptr());
  if (tables == 1) {
    at::parallel_for(0, n, 1 << 14, [=](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        dst[i] = tp[src[i]];
      }
    });
  } else {
    const int64_t rows = channels == 0 ? 0 : n / channels;
    at::parallel_for(0, rows, 64, [=](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        for (int64_t c = 0; c < channels; ++c) {
          dst[r * channels + c] = tp[c * 256 + src[r * channels + c]];
        }
      }
    });
  }
  return out;
}

// scale and zero point: one value, or one per channel of the last dimension
void check_params(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& zero, const char* op) {
  const int64_t channels = x.dim() == 0 ? 1 : x.size(-1);
  for (const at::Tensor* t : {&scale, &zero}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->dim() == 1 && (t->size(0) == 1 || t->size(0) == channels),
                "fxquant::", op, ": scale and zero point must be float32 (1,) or (C,), got ", t->sizes());
  }
}

// clamp(round(x / s) + z, lo, hi) for n values; locals and restrict pointers so that it vectorizes
// (a uint8 store may alias anything, so values read through captured references would be re-read).
inline void quantize_span(const float* __restrict src, uint8_t* __restrict dst, int64_t n, float s, float z, float lo,
                          float hi) {
  for (int64_t i = 0; i < n; ++i) {
    float y = std::rint(src[i] / s) + z;
    y = y < lo ? lo : y;
    y = y > hi ? hi : y;
    dst[i] = static_cast<uint8_t>(static_cast<int32_t>(y));
  }
}

inline void quantize_channels(const float* __restrict src, uint8_t* __restrict dst, int64_t k,
                              const float* __restrict sp, const float* __restrict zp, float lo, float hi) {
  for (int64_t c = 0; c < k; ++c) {
    float y = std::rint(src[c] / sp[c]) + zp[c];
    y = y < lo ? lo : y;
    y = y > hi ? hi : y;
    dst[c] = static_cast<uint8_t>(static_cast<int32_t>(y));
  }
}

// QuantizeCodes: clamp(round_half_even(x / scale) + zero_point, qmin, qmax) in float32, as
// fxquant.runtime.integer.quantize_codes; one pass.
at::Tensor quantize_rows(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& zero, int64_t qmin,
                         int64_t qmax, bool out_uint8) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat, "fxquant::quantize_rows: x must be float32 CPU");
  check_params(x, scale, zero, "quantize_rows");
  const at::Tensor in = x.contiguous(), sc = scale.contiguous(), zp = zero.contiguous();
  at::Tensor out = at::empty(x.sizes(), x.options().dtype(out_uint8 ? at::kByte : at::kChar));
  const int64_t n = in.numel(), k = sc.size(0);
  if (n == 0) {
    return out;
  }
  const float *src = in.data_ptr<float>(), *sp = sc.data_ptr<float>(), *zpp = zp.data_ptr<float>();
  uint8_t* dst = static_cast<uint8_t*>(out.data_ptr());
  const float lo = static_cast<float>(qmin), hi = static_cast<float>(qmax);
  if (k == 1) {  // one scale: a flat loop
    const float s = sp[0], z = zpp[0];
    at::parallel_for(0, n, 16384, [=](int64_t begin, int64_t end) {
      quantize_span(src + begin, dst + begin, end - begin, s, z, lo, hi);
    });
    return out;
  }
  const int64_t rows = n / k;
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / k), [=](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      quantize_channels(src + r * k, dst + r * k, k, sp, zpp, lo, hi);
    }
  });
  return out;
}

// DequantizeCodes: (float(code) - zero_point) * scale [* post_scale] in float32, as
// fxquant.runtime.integer.dequantize_codes; one pass.
at::Tensor dequantize_rows(const at::Tensor& codes, const at::Tensor& scale, const at::Tensor& zero,
                           double post_scale) {
  TORCH_CHECK(codes.device().is_cpu() && (codes.scalar_type() == at::kChar || codes.scalar_type() == at::kByte),
              "fxquant::dequantize_rows: codes must be int8 or uint8 CPU codes, got ", codes.scalar_type());
  check_params(codes, scale, zero, "dequantize_rows");
  const at::Tensor in = codes.contiguous(), sc = scale.contiguous(), zp = zero.contiguous();
  at::Tensor out = at::empty(codes.sizes(), codes.options().dtype(at::kFloat));
  const int64_t n = in.numel(), k = sc.size(0);
  if (n == 0) {
    return out;
  }
  const bool is_uint8 = codes.scalar_type() == at::kByte;
  const uint8_t* src = static_cast<const uint8_t*>(in.data_ptr());
  const float *sp = sc.data_ptr<float>(), *zpp = zp.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  const float post = static_cast<float>(post_scale);
  const bool scaled = post_scale != 1.0;
  if (k == 1) {  // one scale: a flat loop
    const float s = sp[0], z = zpp[0];
    at::parallel_for(0, n, 16384, [=](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const float code = is_uint8 ? static_cast<float>(src[i]) : static_cast<float>(static_cast<int8_t>(src[i]));
        const float y = (code - z) * s;
        dst[i] = scaled ? y * post : y;
      }
    });
    return out;
  }
  const int64_t rows = n / k;
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / k), [=](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const uint8_t* row = src + r * k;
      float* o = dst + r * k;
      for (int64_t c = 0; c < k; ++c) {
        const float code = is_uint8 ? static_cast<float>(row[c]) : static_cast<float>(static_cast<int8_t>(row[c]));
        const float y = (code - zpp[c]) * sp[c];
        o[c] = scaled ? y * post : y;
      }
    }
  });
  return out;
}

// x + DequantizeCodes(codes): the float32 operations of dequantize_codes, then the add, in one
// pass (a residual add reading a point's codes). x float32 with the codes' shape.
at::Tensor dequantize_add(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale,
                          const at::Tensor& zero, double post_scale) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.sizes() == codes.sizes(),
              "fxquant::dequantize_add: x must be float32 CPU with the codes' shape");
  TORCH_CHECK(codes.scalar_type() == at::kChar || codes.scalar_type() == at::kByte,
              "fxquant::dequantize_add: codes must be int8 or uint8, got ", codes.scalar_type());
  check_params(codes, scale, zero, "dequantize_add");
  const at::Tensor in = codes.contiguous(), xs = x.contiguous(), sc = scale.contiguous(), zp = zero.contiguous();
  at::Tensor out = at::empty(x.sizes(), x.options());
  const int64_t n = in.numel(), k = sc.size(0);
  if (n == 0) {
    return out;
  }
  const bool is_uint8 = codes.scalar_type() == at::kByte, scaled = post_scale != 1.0;
  const uint8_t* src = static_cast<const uint8_t*>(in.data_ptr());
  const float *xp = xs.data_ptr<float>(), *sp = sc.data_ptr<float>(), *zpp = zp.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  const float post = static_cast<float>(post_scale);
  at::parallel_for(0, n, 16384, [=](int64_t begin, int64_t end) {
    if (k == 1) {
      const float s = sp[0], z = zpp[0];
      for (int64_t i = begin; i < end; ++i) {
        const float code = is_uint8 ? static_cast<float>(src[i]) : static_cast<float>(static_cast<int8_t>(src[i]));
        const float y = (code - z) * s;
        dst[i] = xp[i] + (scaled ? y * post : y);
      }
    } else {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t c = i % k;
        const float code = is_uint8 ? static_cast<float>(src[i]) : static_cast<float>(static_cast<int8_t>(src[i]));
        const float y = (code - zpp[c]) * sp[c];
        dst[i] = xp[i] + (scaled ? y * post : y);
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fxquant_kernels, m) {
  m.def(
      "ptf_layernorm(Tensor codes, Tensor alpha, int in_zero_point, int eps_int, int sigma_bits, Tensor weight_units, "
      "Tensor offset, int out_zero_point, int qmin, int qmax, bool out_uint8) -> Tensor");
  m.def("code_lut(Tensor codes, Tensor table, bool out_uint8) -> Tensor");
  m.def("quantize_rows(Tensor x, Tensor scale, Tensor zero, int qmin, int qmax, bool out_uint8) -> Tensor");
  m.def("dequantize_rows(Tensor codes, Tensor scale, Tensor zero, float post_scale) -> Tensor");
  m.def("dequantize_add(Tensor x, Tensor codes, Tensor scale, Tensor zero, float post_scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(fxquant_kernels, CPU, m) {
  m.impl("ptf_layernorm", &ptf_layernorm);
  m.impl("code_lut", &code_lut);
  m.impl("quantize_rows", &quantize_rows);
  m.impl("dequantize_rows", &dequantize_rows);
  m.impl("dequantize_add", &dequantize_add);
}
