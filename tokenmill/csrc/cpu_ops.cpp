// CPU kernels for the memory-bound parts of decoding (built on first use by tokenmill/kernels.py).
//
// linear: y = x W^T (* scale) (+ bias) for a few rows of x, reading each weight once. PyTorch's
//   M=1 paths (MKL sgemv, oneDNN) reach 8-17 GB/s on the 2-core dev machine; streaming the
//   weights once per step with AVX-512 reaches the memory bandwidth (see docs/benchmarks/cpu.md).
//   Weights may be float32, bfloat16 or int8 with per-output-channel scales; accumulation is
//   float32.
// paged_attention: attention of query rows over the paged KV cache, read in place (no gather,
//   no padding to the longest sequence): each (sequence, kv head, query row) is one work item.
//
// Only AVX-512 (F, BW, VL) builds are used; elsewhere `available()` is false and the Python side
// keeps PyTorch's own ops.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define TM_AVX512 1
#include <immintrin.h>
#endif

namespace {

#ifdef TM_AVX512

// 16 consecutive elements as float32 (masked tail loads read nothing past the end).
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const at::BFloat16* p) {
  __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}
inline __m512 load16(const int8_t* p) {
  __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(v));
}
inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
inline __m512 load16(const at::BFloat16* p, __mmask16 m) {
  __m256i v = _mm256_maskz_loadu_epi16(m, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}
inline __m512 load16(const int8_t* p, __mmask16 m) {
  __m128i v = _mm_maskz_loadu_epi8(m, p);
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(v));
}

// One weight row (K elements) against M rows of x (float32, row stride K): M dot products.
template <typename W, int M>
inline void dot_rows(const W* w, const float* x, int64_t K, float* out) {
  __m512 acc[M];
  for (int m = 0; m < M; ++m) acc[m] = _mm512_setzero_ps();
  int64_t k = 0;
  if constexpr (M == 1) {
    // Four independent accumulators hide the FMA latency when there is only one row.
    __m512 a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
    for (; k + 64 <= K; k += 64) {
      acc[0] = _mm512_fmadd_ps(load16(w + k), _mm512_loadu_ps(x + k), acc[0]);
      a1 = _mm512_fmadd_ps(load16(w + k + 16), _mm512_loadu_ps(x + k + 16), a1);
      a2 = _mm512_fmadd_ps(load16(w + k + 32), _mm512_loadu_ps(x + k + 32), a2);
      a3 = _mm512_fmadd_ps(load16(w + k + 48), _mm512_loadu_ps(x + k + 48), a3);
    }
    acc[0] = _mm512_add_ps(_mm512_add_ps(acc[0], a1), _mm512_add_ps(a2, a3));
  }
  for (; k + 16 <= K; k += 16) {
    __m512 wv = load16(w + k);
    for (int m = 0; m < M; ++m) acc[m] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + m * K + k), acc[m]);
  }
  if (k < K) {
    __mmask16 mask = static_cast<__mmask16>((1u << (K - k)) - 1);
    __m512 wv = load16(w + k, mask);
    for (int m = 0; m < M; ++m) acc[m] = _mm512_fmadd_ps(wv, _mm512_maskz_loadu_ps(mask, x + m * K + k), acc[m]);
  }
  for (int m = 0; m < M; ++m) out[m] = _mm512_reduce_add_ps(acc[m]);
}

#ifdef __AVX512BF16__
// bfloat16 weights against bfloat16 rows: vdpbf16ps multiplies 32 pairs per instruction straight
// from the stored bits (products exact in float32, accumulated in float32), where widening every
// weight to float32 first made bfloat16 decode compute-bound at ~18 GB/s.
template <int M>
inline void dot_rows_bf16(const at::BFloat16* w, const at::BFloat16* x, int64_t K, float* out) {
  constexpr int A = M == 1 ? 4 : 1;  // independent chains hide vdpbf16ps' latency at one row
  __m512 acc[M][A];
  for (int m = 0; m < M; ++m)
    for (int a = 0; a < A; ++a) acc[m][a] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 * A <= K; k += 32 * A)
    for (int a = 0; a < A; ++a) {
      const __m512bh wv = (__m512bh)_mm512_loadu_si512(w + k + 32 * a);
      for (int m = 0; m < M; ++m)
        acc[m][a] = _mm512_dpbf16_ps(acc[m][a], wv, (__m512bh)_mm512_loadu_si512(x + m * K + k + 32 * a));
    }
  for (; k < K; k += 32) {
    const __mmask32 mask = K - k >= 32 ? ~__mmask32(0) : static_cast<__mmask32>((1ull << (K - k)) - 1);
    const __m512bh wv = (__m512bh)_mm512_maskz_loadu_epi16(mask, w + k);
    for (int m = 0; m < M; ++m)
      acc[m][0] = _mm512_dpbf16_ps(acc[m][0], wv, (__m512bh)_mm512_maskz_loadu_epi16(mask, x + m * K + k));
  }
  for (int m = 0; m < M; ++m) {
    __m512 t = acc[m][0];
    for (int a = 1; a < A; ++a) t = _mm512_add_ps(t, acc[m][a]);
    out[m] = _mm512_reduce_add_ps(t);
  }
}

#endif  // __AVX512BF16__

// M rows of x against one weight row: bfloat16 rows against bfloat16 weights take vdpbf16ps,
// every other pairing widens the weights against float32 rows.
template <typename W, typename X, int M>
inline void dot_rows_any(const W* w, const X* x, int64_t K, float* out) {
  if constexpr (std::is_same_v<X, float>) {
    dot_rows<W, M>(w, x, K, out);
  } else {
#ifdef __AVX512BF16__
    static_assert(std::is_same_v<W, at::BFloat16> && std::is_same_v<X, at::BFloat16>);
    dot_rows_bf16<M>(w, x, K, out);
#endif
  }
}

template <typename W, typename X, int M>
void linear_tile(const W* w, const X* x, const float* scale, const float* bias, float* y, int64_t N, int64_t K) {
  // Threads split the output channels, so each weight row is read by one thread, once.
  const int64_t grain = std::max<int64_t>(16, N / (4 * at::get_num_threads()) + 1);
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
    float r[M];
    for (int64_t n = n0; n < n1; ++n) {
      dot_rows_any<W, X, M>(w + n * K, x, K, r);
      const float s = scale ? scale[n] : 1.0f;
      const float b = bias ? bias[n] : 0.0f;
      for (int m = 0; m < M; ++m) y[m * N + n] = r[m] * s + b;
    }
  });
}

template <typename W, typename X>
void linear_impl(const W* w, const X* x, const float* scale, const float* bias, float* y, int64_t M, int64_t N,
                 int64_t K) {
  // Tiles of up to 4 rows of x share each pass over the weights.
  for (int64_t m0 = 0; m0 < M; m0 += 4) {
    const X* xt = x + m0 * K;
    float* yt = y + m0 * N;
    switch (std::min<int64_t>(4, M - m0)) {
      case 1: linear_tile<W, X, 1>(w, xt, scale, bias, yt, N, K); break;
      case 2: linear_tile<W, X, 2>(w, xt, scale, bias, yt, N, K); break;
      case 3: linear_tile<W, X, 3>(w, xt, scale, bias, yt, N, K); break;
      default: linear_tile<W, X, 4>(w, xt, scale, bias, yt, N, K); break;
    }
  }
}

#endif  // TM_AVX512

bool available() {
#ifdef TM_AVX512
  return true;
#else
  return false;
#endif
}

// x: [M, K] float32 or bfloat16; w: [N, K] float32, bfloat16 or int8; scale, bias: [N] float32 or none.
// Returns [M, N] in x's dtype.
torch::Tensor linear(const torch::Tensor& x, const torch::Tensor& w, const c10::optional<torch::Tensor>& scale,
                     const c10::optional<torch::Tensor>& bias) {
  TORCH_CHECK(available(), "tokenmill cpu_ops were built without AVX-512");
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "linear: shapes ", x.sizes(), " and ",
              w.sizes(), " do not match");
  TORCH_CHECK(w.is_contiguous(), "linear: weight must be contiguous");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "linear: x must be float32 or bfloat16");
  const int64_t M = x.size(0), N = w.size(0), K = w.size(1);
  const float* sp = nullptr;
  const float* bp = nullptr;
  torch::Tensor sc, bs;
  if (scale.has_value()) {
    sc = scale->to(at::kFloat).contiguous();
    TORCH_CHECK(sc.numel() == N, "linear: scale needs ", N, " elements");
    sp = sc.data_ptr<float>();
  }
  if (bias.has_value()) {
    bs = bias->to(at::kFloat).contiguous();
    TORCH_CHECK(bs.numel() == N, "linear: bias needs ", N, " elements");
    bp = bs.data_ptr<float>();
  }
  torch::Tensor y = torch::empty({M, N}, x.options().dtype(at::kFloat));
#if defined(TM_AVX512) && defined(__AVX512BF16__)
  if (w.scalar_type() == at::kBFloat16 && x.scalar_type() == at::kBFloat16 && !scale.has_value()) {
    const torch::Tensor xc = x.contiguous();
    linear_impl(w.data_ptr<at::BFloat16>(), xc.data_ptr<at::BFloat16>(), sp, bp, y.data_ptr<float>(), M, N, K);
    return y.to(x.scalar_type());
  }
#endif
#ifdef TM_AVX512
  const torch::Tensor xf = x.to(at::kFloat).contiguous();
  const float* xp = xf.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  switch (w.scalar_type()) {
    case at::kFloat: linear_impl(w.data_ptr<float>(), xp, sp, bp, yp, M, N, K); break;
    case at::kBFloat16: linear_impl(w.data_ptr<at::BFloat16>(), xp, sp, bp, yp, M, N, K); break;
    case at::kChar: linear_impl(w.data_ptr<int8_t>(), xp, sp, bp, yp, M, N, K); break;
    default: TORCH_CHECK(false, "linear: unsupported weight dtype ", w.scalar_type());
  }
#endif
  return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}

#ifdef TM_AVX512

inline float dot_head(const float* k, const float* q, int64_t D) {
  __m512 acc = _mm512_setzero_ps();
  int64_t d = 0;
  for (; d + 16 <= D; d += 16) acc = _mm512_fmadd_ps(load16(k + d), _mm512_loadu_ps(q + d), acc);
  if (d < D) {
    __mmask16 mask = static_cast<__mmask16>((1u << (D - d)) - 1);
    acc = _mm512_fmadd_ps(load16(k + d, mask), _mm512_maskz_loadu_ps(mask, q + d), acc);
  }
  return _mm512_reduce_add_ps(acc);
}

// out[0:D] += p * v[0:D]
inline void axpy_head(float p, const float* v, float* out, int64_t D) {
  const __m512 pv = _mm512_set1_ps(p);
  int64_t d = 0;
  for (; d + 16 <= D; d += 16) _mm512_storeu_ps(out + d, _mm512_fmadd_ps(pv, load16(v + d), _mm512_loadu_ps(out + d)));
  if (d < D) {
    __mmask16 mask = static_cast<__mmask16>((1u << (D - d)) - 1);
    _mm512_mask_storeu_ps(out + d, mask, _mm512_fmadd_ps(pv, load16(v + d, mask), _mm512_maskz_loadu_ps(mask, out + d)));
  }
}

// exp for x <= 0 (softmax after subtracting the max): Cephes' expf polynomial on the reduced
// argument, scaled by 2^n with vscalefps; within 2 ulp of std::exp.
inline __m512 exp_nonpos(__m512 x) {
  x = _mm512_max_ps(_mm512_set1_ps(-87.0f), x);  // x second: maxps returns it when it is NaN
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  const __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187045e-6f), f);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  const __m512 y = _mm512_add_ps(_mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r), _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(y, n);
}

// In place: s[0:L] = exp(s[0:L] - max); returns the max, and the sum of the exps in *sum.
inline float exp_shifted(float* s, int64_t L, float* sum) {
  __m512 vmax = _mm512_set1_ps(-INFINITY);
  int64_t i = 0;
  for (; i + 16 <= L; i += 16) vmax = _mm512_max_ps(vmax, _mm512_loadu_ps(s + i));
  if (i < L) {
    const __mmask16 mask = static_cast<__mmask16>((1u << (L - i)) - 1);
    vmax = _mm512_mask_max_ps(vmax, mask, vmax, _mm512_maskz_loadu_ps(mask, s + i));
  }
  const float mx = _mm512_reduce_max_ps(vmax);
  const __m512 m = _mm512_set1_ps(mx);
  __m512 vsum = _mm512_setzero_ps();
  for (i = 0; i + 16 <= L; i += 16) {
    const __m512 e = exp_nonpos(_mm512_sub_ps(_mm512_loadu_ps(s + i), m));
    _mm512_storeu_ps(s + i, e);
    vsum = _mm512_add_ps(vsum, e);
  }
  if (i < L) {
    const __mmask16 mask = static_cast<__mmask16>((1u << (L - i)) - 1);
    const __m512 e = exp_nonpos(_mm512_sub_ps(_mm512_maskz_loadu_ps(mask, s + i), m));
    _mm512_mask_storeu_ps(s + i, mask, e);
    vsum = _mm512_mask_add_ps(vsum, mask, vsum, e);
  }
  *sum = _mm512_reduce_add_ps(vsum);
  return mx;
}

// out[0:16*NV] += sum over n tokens of p[i] * v_i (v_i at stride tok_stride), the accumulator held
// in registers across the tokens (a read-modify-write of out per token is latency-bound).
template <int NV>
inline void add_weighted_values(const float* p, const float* vp, int64_t n, int64_t tok_stride, float* out) {
  // Even and odd tokens in separate accumulators: two FMA chains in flight instead of one.
  __m512 acc[NV], acc2[NV];
  for (int j = 0; j < NV; ++j) {
    acc[j] = _mm512_loadu_ps(out + 16 * j);
    acc2[j] = _mm512_setzero_ps();
  }
  int64_t i = 0;
  for (; i + 2 <= n; i += 2, vp += 2 * tok_stride) {
    const __m512 p0 = _mm512_set1_ps(p[i]), p1 = _mm512_set1_ps(p[i + 1]);
    for (int j = 0; j < NV; ++j) {
      acc[j] = _mm512_fmadd_ps(p0, load16(vp + 16 * j), acc[j]);
      acc2[j] = _mm512_fmadd_ps(p1, load16(vp + tok_stride + 16 * j), acc2[j]);
    }
  }
  if (i < n) {
    const __m512 p0 = _mm512_set1_ps(p[i]);
    for (int j = 0; j < NV; ++j) acc[j] = _mm512_fmadd_ps(p0, load16(vp + 16 * j), acc[j]);
  }
  for (int j = 0; j < NV; ++j) _mm512_storeu_ps(out + 16 * j, _mm512_add_ps(acc[j], acc2[j]));
}

inline void add_weighted_values_any(const float* p, const float* vp, int64_t n, int64_t tok_stride, float* out, int64_t D) {
  switch (D) {
    case 16: add_weighted_values<1>(p, vp, n, tok_stride, out); return;
    case 32: add_weighted_values<2>(p, vp, n, tok_stride, out); return;
    case 48: add_weighted_values<3>(p, vp, n, tok_stride, out); return;
    case 64: add_weighted_values<4>(p, vp, n, tok_stride, out); return;
    case 96: add_weighted_values<6>(p, vp, n, tok_stride, out); return;
    case 128: add_weighted_values<8>(p, vp, n, tok_stride, out); return;
    default:
      for (int64_t i = 0; i < n; ++i, vp += tok_stride) axpy_head(p[i], vp, out, D);
  }
}

// Copies n contiguous elements into the float32 staging buffer and returns it: one sequential read
// of a cache block, where the heads' passes over it would touch it in strided thirds from memory
// (30 layers at 700 tokens of context, batch 1: 3.5 -> 2.6 ms; software prefetch of the next
// block or of the next work item's blocks gained nothing measurable here). bfloat16 is widened
// here, once per element, not once per query head that reads it (32 rows at 300 tokens, 30
// layers, cache in L3: 14 -> 9 ms).
inline const float* stage_rows(const float* src, int64_t n, std::vector<float>& stage) {
  std::memcpy(stage.data(), src, n * sizeof(float));
  return stage.data();
}
inline const float* stage_rows(const at::BFloat16* src, int64_t n, std::vector<float>& stage) {
  float* dst = stage.data();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(dst + i, load16(src + i));
  if (i < n) {
    const __mmask16 mask = static_cast<__mmask16>((1u << (n - i)) - 1);
    _mm512_mask_storeu_ps(dst + i, mask, load16(src + i, mask));
  }
  return dst;
}

// Lane j of the result = the sum of a[j]'s 16 lanes: 16 horizontal sums in 45 shuffles and adds
// (one _mm512_reduce_add_ps per vector costs twice that and serialises on its latency).
inline __m512 reduce16(const __m512* a) {
  __m512 b[8], c[4];
  for (int i = 0; i < 8; ++i)
    b[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]), _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
  for (int i = 0; i < 4; ++i)
    c[i] = _mm512_add_ps(_mm512_shuffle_ps(b[2 * i], b[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(b[2 * i], b[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  // c[i]'s 128-bit lane l holds lane l's partial sums of a[4i .. 4i+3].
  const __m512 u01 = _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], 0x44), _mm512_shuffle_f32x4(c[0], c[1], 0xEE));
  const __m512 u23 = _mm512_add_ps(_mm512_shuffle_f32x4(c[2], c[3], 0x44), _mm512_shuffle_f32x4(c[2], c[3], 0xEE));
  return _mm512_add_ps(_mm512_shuffle_f32x4(u01, u23, 0x88), _mm512_shuffle_f32x4(u01, u23, 0xDD));
}

// out[0:m] = scale * (k_i . q) for m <= 16 keys k_i at stride tok_stride, head dim 16 * NV.
template <int NV>
inline void scores16(const float* k, int64_t tok_stride, int64_t m, const float* q, float scale, float* out) {
  __m512 qv[NV];
  for (int j = 0; j < NV; ++j) qv[j] = _mm512_loadu_ps(q + 16 * j);
  __m512 acc[16];
  for (int64_t i = 0; i < 16; ++i) {
    if (i < m) {
      const float* ki = k + i * tok_stride;
      __m512 a = _mm512_mul_ps(load16(ki), qv[0]);
      for (int j = 1; j < NV; ++j) a = _mm512_fmadd_ps(load16(ki + 16 * j), qv[j], a);
      acc[i] = a;
    } else {
      acc[i] = _mm512_setzero_ps();
    }
  }
  const __m512 r = _mm512_mul_ps(reduce16(acc), _mm512_set1_ps(scale));
  _mm512_mask_storeu_ps(out, static_cast<__mmask16>((1u << m) - 1), r);
}

inline void scores16_any(const float* k, int64_t tok_stride, int64_t m, const float* q, float scale, float* out,
                         int64_t D) {
  switch (D) {
    case 16: scores16<1>(k, tok_stride, m, q, scale, out); return;
    case 32: scores16<2>(k, tok_stride, m, q, scale, out); return;
    case 48: scores16<3>(k, tok_stride, m, q, scale, out); return;
    case 64: scores16<4>(k, tok_stride, m, q, scale, out); return;
    case 96: scores16<6>(k, tok_stride, m, q, scale, out); return;
    case 128: scores16<8>(k, tok_stride, m, q, scale, out); return;
    default:
      for (int64_t i = 0; i < m; ++i) out[i] = dot_head(k + i * tok_stride, q, D) * scale;
  }
}

// Keys per work item. Each query row's keys are cut into splits of this many positions, a
// function of the row alone, so a sequence gets the same result whatever else is in the batch.
constexpr int64_t kSplit = 128;

// One work item: all H query heads of one query row over keys [lo, hi) (at most kSplit). Every kv
// head of a token sits in one contiguous row of the cache, so the item streams K and then V
// block by block in address order (reading one kv head's slice across tokens instead left the
// loads latency-bound: 5 GB/s). Leaves the unnormalised output o [H, D], each head's score max
// m [H] and sum of exps l [H] for the combination of splits.
template <typename T>
void attend_split(const float* q, const T* kc, const T* vc, const int64_t* table, int64_t block_size, int64_t KVH,
                  int64_t D, int64_t G, int64_t lo, int64_t hi, float scale, float* o, float* m, float* l,
                  float* scores) {
  const int64_t L = hi - lo, H = KVH * G;
  const int64_t tok_stride = KVH * D, blk_stride = block_size * tok_stride;
  thread_local std::vector<float> stage;
  if (stage.size() < static_cast<size_t>(blk_stride)) stage.resize(blk_stride);
  for (int64_t t = lo; t < hi;) {
    const int64_t off = t % block_size, n = std::min(block_size - off, hi - t);
    const float* kp = stage_rows(kc + table[t / block_size] * blk_stride + off * tok_stride, n * tok_stride, stage);
    for (int64_t i0 = 0; i0 < n; i0 += 16) {
      const int64_t m = std::min<int64_t>(16, n - i0);
      for (int64_t h = 0; h < H; ++h)
        scores16_any(kp + i0 * tok_stride + (h / G) * D, tok_stride, m, q + h * D, scale,
                     scores + h * L + (t + i0 - lo), D);
    }
    t += n;
  }
  for (int64_t h = 0; h < H; ++h) m[h] = exp_shifted(scores + h * L, L, l + h);
  std::fill(o, o + H * D, 0.0f);
  for (int64_t t = lo; t < hi;) {
    const int64_t off = t % block_size, n = std::min(block_size - off, hi - t);
    const float* vp = stage_rows(vc + table[t / block_size] * blk_stride + off * tok_stride, n * tok_stride, stage);
    for (int64_t h = 0; h < H; ++h)
      add_weighted_values_any(scores + h * L + (t - lo), vp + (h / G) * D, n, tok_stride, o + h * D, D);
    t += n;
  }
}

#endif  // TM_AVX512

// q: [T, H, D]; k_cache, v_cache: [num_blocks, block_size, KVH, D]; block_tables: [B, max_blocks] int64;
// seq_lens: [B] int64 (context length including this step's tokens); query_start_loc: [B + 1] int64.
// Query row i of sequence b sits at position seq_lens[b] - q_len + i and attends keys up to it
// (within the sliding window when window > 0). Returns [T, H, D] in q's dtype.
torch::Tensor paged_attention(const torch::Tensor& q, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                              const torch::Tensor& block_tables, const torch::Tensor& seq_lens,
                              const torch::Tensor& query_start_loc, double scale, int64_t window) {
  TORCH_CHECK(available(), "tokenmill cpu_ops were built without AVX-512");
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(), "paged_attention: bad shapes");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "paged_attention: caches must be contiguous");
  TORCH_CHECK(k_cache.scalar_type() == at::kFloat || k_cache.scalar_type() == at::kBFloat16,
              "paged_attention: cache must be float32 or bfloat16");
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && seq_lens.scalar_type() == at::kLong &&
                  query_start_loc.scalar_type() == at::kLong,
              "paged_attention: metadata must be int64");
  const int64_t T = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t block_size = k_cache.size(1), KVH = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == D && H % KVH == 0, "paged_attention: head shapes do not match");
  const int64_t G = H / KVH;
  const int64_t B = seq_lens.numel();
  TORCH_CHECK(query_start_loc.numel() == B + 1 && block_tables.size(0) >= B, "paged_attention: metadata sizes");
  const torch::Tensor qf = q.to(at::kFloat).contiguous();
  const torch::Tensor tables = block_tables.contiguous();
  const int64_t* lens = seq_lens.data_ptr<int64_t>();
  const int64_t* qsl = query_start_loc.data_ptr<int64_t>();
  TORCH_CHECK(qsl[0] == 0 && qsl[B] == T, "paged_attention: query_start_loc must run from 0 to the number of query rows");
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(lens[b] >= qsl[b + 1] - qsl[b] && qsl[b + 1] >= qsl[b], "paged_attention: sequence ", b,
                " has more query rows than context");
  torch::Tensor out = torch::empty({T, H, D}, q.options().dtype(at::kFloat));
#ifdef TM_AVX512
  // Work items: (query row, split of its keys); row_lo/row_first say where each row's keys start
  // and its first item.
  std::vector<int64_t> row_seq(T), row_lo(T), row_hi(T), row_first(T + 1);
  row_first[0] = 0;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t row = qsl[b]; row < qsl[b + 1]; ++row) {
      const int64_t hi = lens[b] - (qsl[b + 1] - qsl[b]) + (row - qsl[b]) + 1;
      row_seq[row] = b;
      row_hi[row] = hi;
      row_lo[row] = window > 0 ? std::max<int64_t>(0, hi - window) : 0;
      row_first[row + 1] = row_first[row] + (hi - row_lo[row] + kSplit - 1) / kSplit;
    }
  const int64_t items = row_first[T];
  // Per item: o [H, D], m [H], l [H]; every entry is written by its item (no zero fill).
  std::unique_ptr<float[]> part(new float[static_cast<size_t>(items * H * (D + 2))]);
  const float* qp = qf.data_ptr<float>();
  const int64_t* tp = tables.data_ptr<int64_t>();
  const int64_t max_blocks = tables.size(1);
  const float sc = static_cast<float>(scale);
  const bool f32 = k_cache.scalar_type() == at::kFloat;
  at::parallel_for(0, items, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> scores(static_cast<size_t>(H * kSplit));
    for (int64_t item = i0; item < i1; ++item) {
      const int64_t row = std::upper_bound(row_first.begin(), row_first.end(), item) - row_first.begin() - 1;
      const int64_t lo = row_lo[row] + (item - row_first[row]) * kSplit;
      const int64_t hi = std::min(row_hi[row], lo + kSplit);
      const int64_t* table = tp + row_seq[row] * max_blocks;
      float* o = part.get() + item * H * (D + 2);
      float* m = o + H * D;
      float* l = m + H;
      if (f32)
        attend_split(qp + row * H * D, k_cache.data_ptr<float>(), v_cache.data_ptr<float>(), table, block_size, KVH,
                     D, G, lo, hi, sc, o, m, l, scores.data());
      else
        attend_split(qp + row * H * D, k_cache.data_ptr<at::BFloat16>(), v_cache.data_ptr<at::BFloat16>(), table,
                     block_size, KVH, D, G, lo, hi, sc, o, m, l, scores.data());
    }
  });
  // Combine each row's splits (in split order): out = sum_s e^(m_s - M) o_s / sum_s e^(m_s - M) l_s.
  float* op = out.data_ptr<float>();
  at::parallel_for(0, T, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t row = r0; row < r1; ++row)
      for (int64_t h = 0; h < H; ++h) {
        float M = -INFINITY;
        for (int64_t it = row_first[row]; it < row_first[row + 1]; ++it)
          M = std::max(M, part[it * H * (D + 2) + H * D + h]);
        float den = 0.0f;
        float* dst = op + (row * H + h) * D;
        std::fill(dst, dst + D, 0.0f);
        for (int64_t it = row_first[row]; it < row_first[row + 1]; ++it) {
          const float* base = part.get() + it * H * (D + 2);
          const float w = std::exp(base[H * D + h] - M);
          den += w * base[H * D + H + h];
          axpy_head(w, base + h * D, dst, D);
        }
        const float inv = 1.0f / den;
        for (int64_t d = 0; d < D; ++d) dst[d] *= inv;
      }
  });
#endif
  return q.scalar_type() == at::kFloat ? out : out.to(q.scalar_type());
}

// Small fused elementwise ops: at batch 1 each PyTorch op costs more in dispatch than in work,
// and a layer had ~40 of them.

// HF's RMSNorm: float32 math, the normalised value rounded to x's dtype, then times the weight.
torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 1 && weight.size(0) == x.size(1), "rms_norm: bad shapes");
  TORCH_CHECK(x.scalar_type() == weight.scalar_type(), "rms_norm: x and weight dtypes differ");
  const torch::Tensor xc = x.contiguous();
  torch::Tensor out = torch::empty_like(xc);
  const int64_t T = xc.size(0), C = xc.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, xc.scalar_type(), "rms_norm", [&] {
    const scalar_t* xp = xc.data_ptr<scalar_t>();
    const scalar_t* wp = weight.contiguous().data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, T, 16, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const scalar_t* row = xp + t * C;
        float ss = 0.0f;
        for (int64_t c = 0; c < C; ++c) ss += static_cast<float>(row[c]) * static_cast<float>(row[c]);
        const float inv = 1.0f / std::sqrt(ss / static_cast<float>(C) + static_cast<float>(eps));
        for (int64_t c = 0; c < C; ++c)
          op[t * C + c] = wp[c] * static_cast<scalar_t>(static_cast<float>(row[c]) * inv);
      }
    });
  });
  return out;
}

// Rotate-half RoPE in place on x: [T, heads, D] (any row stride, heads contiguous), with
// cos/sin: [T, D] float32 (the table rows of each token's position).
void rope_(torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin) {
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1 && x.stride(1) == x.size(2), "rope_: x must be [T, heads, D] with contiguous heads");
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat && cos.is_contiguous() && sin.is_contiguous(),
              "rope_: cos/sin must be contiguous float32");
  const int64_t T = x.size(0), NH = x.size(1), D = x.size(2), half = D / 2, rs = x.stride(0);
  TORCH_CHECK(cos.size(0) == T && cos.size(1) == D, "rope_: cos/sin must be [T, D]");
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "rope_", [&] {
    scalar_t* xp = x.data_ptr<scalar_t>();
    const float* cp = cos.data_ptr<float>();
    const float* sp = sin.data_ptr<float>();
    at::parallel_for(0, T, 16, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        // As HF: cos/sin are first rounded to x's dtype and every product is rounded too.
        for (int64_t h = 0; h < NH; ++h) {
          scalar_t* v = xp + t * rs + h * D;
          for (int64_t i = 0; i < half; ++i) {
            const scalar_t a = v[i], b = v[i + half];
            const scalar_t c1 = static_cast<scalar_t>(cp[t * D + i]), s1 = static_cast<scalar_t>(sp[t * D + i]);
            const scalar_t c2 = static_cast<scalar_t>(cp[t * D + i + half]), s2 = static_cast<scalar_t>(sp[t * D + i + half]);
            v[i] = static_cast<scalar_t>(a * c1) + static_cast<scalar_t>(-b * s1);
            v[i + half] = static_cast<scalar_t>(b * c2) + static_cast<scalar_t>(a * s2);
          }
        }
      }
    });
  });
}

// silu(gate) * up for gate_up: [T, 2I] -> [T, I].
#ifdef TM_AVX512
// float32 -> bfloat16, round to nearest even (c10::BFloat16's conversion, NaN -> 0x7FC0).
inline __m256i to_bf16(__m512 v) {
  const __m512i b = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(b, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  return _mm512_cvtepi32_epi16(r);
}
inline void store16(float* p, __m512 v, __mmask16 m) { _mm512_mask_storeu_ps(p, m, v); }
inline void store16(at::BFloat16* p, __m512 v, __mmask16 m) {
  _mm256_mask_storeu_epi16(reinterpret_cast<__m256i*>(p), m, to_bf16(v));
}
inline __m512 round_to(float*, __m512 v) { return v; }
inline __m512 round_to(at::BFloat16*, __m512 v) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(to_bf16(v)), 16));
}

// silu(g) = g * sigmoid(g), sigmoid from e = exp(-|g|) <= 1 so the exp never overflows.
inline __m512 silu16(__m512 g) {
  const __m512 one = _mm512_set1_ps(1.0f);
  const __m512 e = exp_nonpos(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_abs_ps(g)));
  const __m512 sig = _mm512_div_ps(_mm512_mask_blend_ps(_mm512_cmp_ps_mask(g, _mm512_setzero_ps(), _CMP_LT_OQ),
                                                        one, e), _mm512_add_ps(one, e));
  return _mm512_mul_ps(g, sig);
}
#endif

// One row of silu(gate) * up, each product rounded as PyTorch's F.silu(gate) * up rounds it (the
// activation to the dtype first).
template <typename T>
void silu_mul_row(const T* g, const T* u, T* o, int64_t I) {
  int64_t i = 0;
#ifdef TM_AVX512
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, at::BFloat16>) {
    for (; i < I; i += 16) {
      const __mmask16 m = I - i >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (I - i)) - 1);
      store16(o + i, _mm512_mul_ps(round_to(o, silu16(load16(g + i, m))), load16(u + i, m)), m);
    }
  }
#endif
  for (; i < I; ++i) {
    const float x = static_cast<float>(g[i]);
    const T act = static_cast<T>(x / (1.0f + std::exp(-x)));
    o[i] = act * u[i];
  }
}

// silu(gate) * up over [gate | up] rows. Vectorized: the scalar std::exp loop cost about as
// much as the GEMMs of the same rows in bfloat16 prefill.
torch::Tensor silu_mul(const torch::Tensor& gate_up) {
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.size(1) % 2 == 0 && gate_up.is_contiguous(), "silu_mul: bad input");
  const int64_t T = gate_up.size(0), I = gate_up.size(1) / 2;
  torch::Tensor out = torch::empty({T, I}, gate_up.options());
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, gate_up.scalar_type(), "silu_mul", [&] {
    const scalar_t* gp = gate_up.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, T, std::max<int64_t>(1, 16384 / std::max<int64_t>(I, 1)), [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) silu_mul_row(gp + t * 2 * I, gp + t * 2 * I + I, op + t * I, I);
    });
  });
  return out;
}


// The decoder layers of a step whose chunks are all short (decodes, speculative verification,
// prompt tails), run from C++: one Python call per step instead of ~15 per layer, whose
// dispatch cost about as much as the weights' memory traffic at batch 1. The same kernels in
// the same order as the Python path (tokenmill/model/transformer.py), so the results are
// bit-identical; weights are bound once after loading.
struct LayerWeights {
  torch::Tensor in_norm, post_norm, q_norm, k_norm;  // q_norm/k_norm undefined without qk-norm
  torch::Tensor qkv_w, o_w, gate_up_w, down_w;
  c10::optional<torch::Tensor> qkv_s, qkv_b, o_s, o_b, gate_up_s, gate_up_b, down_s, down_b;
  // The weights prepacked for oneDNN (tokenmill/model/linear.py prepack_weight), or none.
  c10::optional<torch::Tensor> qkv_p, o_p, gate_up_p, down_p;
  int64_t window = 0;
};

class Decoder {
 public:
  Decoder(int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, double eps, double scale,
          torch::Tensor final_norm, int64_t max_rows_f32, int64_t max_rows_bf16, int64_t max_rows_int8,
          bool native_bf16)
      : H_(num_heads), KVH_(num_kv_heads), D_(head_dim), eps_(eps), scale_(scale),
        final_norm_(std::move(final_norm)), max_f32_(max_rows_f32), max_bf16_(max_rows_bf16), max_i8_(max_rows_int8),
        native_bf16_(native_bf16) {}

  void add_layer(torch::Tensor in_norm, torch::Tensor post_norm, c10::optional<torch::Tensor> q_norm,
                 c10::optional<torch::Tensor> k_norm, torch::Tensor qkv_w, c10::optional<torch::Tensor> qkv_s,
                 c10::optional<torch::Tensor> qkv_b, c10::optional<torch::Tensor> qkv_p, torch::Tensor o_w,
                 c10::optional<torch::Tensor> o_s, c10::optional<torch::Tensor> o_b, c10::optional<torch::Tensor> o_p,
                 torch::Tensor gate_up_w, c10::optional<torch::Tensor> gate_up_s,
                 c10::optional<torch::Tensor> gate_up_b, c10::optional<torch::Tensor> gate_up_p, torch::Tensor down_w,
                 c10::optional<torch::Tensor> down_s, c10::optional<torch::Tensor> down_b,
                 c10::optional<torch::Tensor> down_p, int64_t window) {
    TORCH_CHECK(q_norm.has_value() == k_norm.has_value(), "Decoder: q_norm and k_norm go together");
    LayerWeights l;
    l.in_norm = in_norm; l.post_norm = post_norm;
    if (q_norm.has_value()) { l.q_norm = *q_norm; l.k_norm = *k_norm; }
    l.qkv_w = qkv_w; l.qkv_s = qkv_s; l.qkv_b = qkv_b; l.qkv_p = qkv_p;
    l.o_w = o_w; l.o_s = o_s; l.o_b = o_b; l.o_p = o_p;
    l.gate_up_w = gate_up_w; l.gate_up_s = gate_up_s; l.gate_up_b = gate_up_b; l.gate_up_p = gate_up_p;
    l.down_w = down_w; l.down_s = down_s; l.down_b = down_b; l.down_p = down_p;
    l.window = window;
    layers_.push_back(std::move(l));
  }

  // x: [T, C] embeddings; cos/sin: [T, D] float32 rows of the tokens' positions; kv_caches: one
  // [2, blocks, block_size, KVH, D] per layer. Returns the final-normed hidden states [T, C].
  torch::Tensor forward(torch::Tensor x, const torch::Tensor& cos, const torch::Tensor& sin,
                        const std::vector<torch::Tensor>& kv_caches, const torch::Tensor& slot_mapping,
                        const torch::Tensor& block_tables, const torch::Tensor& seq_lens,
                        const torch::Tensor& query_start_loc) {
    TORCH_CHECK(kv_caches.size() == layers_.size(), "Decoder: one KV cache per layer");
    TORCH_CHECK(slot_mapping.scalar_type() == at::kLong && slot_mapping.numel() == x.size(0), "Decoder: slot_mapping");
    const int64_t T = x.size(0), H = H_, KVH = KVH_, D = D_;
    for (size_t i = 0; i < layers_.size(); ++i) {
      const LayerWeights& l = layers_[i];
      const torch::Tensor& cache = kv_caches[i];
      torch::Tensor qkv = lin(rms_norm(x, l.in_norm, eps_), l.qkv_w, l.qkv_s, l.qkv_b, l.qkv_p);
      torch::Tensor v = qkv.narrow(1, (H + KVH) * D, KVH * D).view({T, KVH, D});
      torch::Tensor q, k;
      if (!l.q_norm.defined()) {
        torch::Tensor qk = qkv.narrow(1, 0, (H + KVH) * D).view({T, H + KVH, D});
        rope_(qk, cos, sin);
        q = qk.narrow(1, 0, H);
        k = qk.narrow(1, H, KVH);
      } else {
        q = rms_norm(qkv.narrow(1, 0, H * D).reshape({T * H, D}), l.q_norm, eps_).view({T, H, D});
        k = rms_norm(qkv.narrow(1, H * D, KVH * D).reshape({T * KVH, D}), l.k_norm, eps_).view({T, KVH, D});
        rope_(q, cos, sin);
        rope_(k, cos, sin);
      }
      write_cache(k, v, cache, slot_mapping);
      torch::Tensor attn = paged_attention(q, cache[0], cache[1], block_tables, seq_lens, query_start_loc, scale_,
                                           l.window);
      x = x + lin(attn.reshape({T, H * D}), l.o_w, l.o_s, l.o_b, l.o_p);
      x = x + lin(silu_mul(lin(rms_norm(x, l.post_norm, eps_), l.gate_up_w, l.gate_up_s, l.gate_up_b, l.gate_up_p)),
                  l.down_w, l.down_s, l.down_b, l.down_p);
    }
    return rms_norm(x, final_norm_, eps_);
  }

  int64_t num_layers() const { return static_cast<int64_t>(layers_.size()); }

 private:
  // tokenmill/model/linear.py's `linear`: the kernel for few rows, PyTorch's GEMM beyond.
  torch::Tensor lin(const torch::Tensor& x, const torch::Tensor& w, const c10::optional<torch::Tensor>& s,
                    const c10::optional<torch::Tensor>& b, const c10::optional<torch::Tensor>& packed) const {
    const int64_t max_rows = w.scalar_type() == at::kFloat ? max_f32_ : w.scalar_type() == at::kBFloat16 ? max_bf16_
                             : w.scalar_type() == at::kChar ? max_i8_ : 0;
    if (x.size(0) <= max_rows) return linear(x, w, s, b);
    // bfloat16 on a CPU without AVX512-BF16 or AMX: its GEMM is emulated, 3-5x slower than float32's
    // (linear.py's _float32_gemm: from 48 rows, or any rows for a weight of at most 8M elements).
    const bool f32 = x.scalar_type() == at::kBFloat16 && !native_bf16_ && (x.size(0) >= 48 || w.numel() <= (8 << 20));
    if (packed.has_value() && !f32) return packed_linear(x, *packed, b);
    if (s.has_value() || f32) {  // int8: the exact weights in float32, rounded once at the end (as the kernel)
      const torch::Tensor wd = s.has_value() ? w.to(at::kFloat) * s->unsqueeze(1) : w.to(at::kFloat);
      const c10::optional<torch::Tensor> bf =
          b.has_value() ? c10::optional<torch::Tensor>(b->to(at::kFloat)) : c10::nullopt;
      return at::linear(x.to(at::kFloat), wd, bf).to(x.scalar_type());
    }
    return at::linear(x, w, b);
  }

  // torch.ops.mkldnn._linear_pointwise(x, packed, b, "none", [], None): the Python path's call (it
  // passes "" as the algorithm, which "none" ignores),
  // through the dispatcher (the op has no C++ header).
  static torch::Tensor packed_linear(const torch::Tensor& x, const torch::Tensor& packed,
                                     const c10::optional<torch::Tensor>& b) {
    static const c10::OperatorHandle op =
        c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_linear_pointwise", "");
    std::vector<c10::IValue> stack{x.contiguous(), packed, b.has_value() ? c10::IValue(*b) : c10::IValue(),
                            c10::IValue(std::string("none")), c10::IValue(c10::List<c10::optional<at::Scalar>>()),
                            c10::IValue()};
    op.callBoxed(&stack);
    return stack.back().toTensor();
  }

  // Rows k[t], v[t] into cache slot slot_mapping[t] (the Python path's index_copy_).
  void write_cache(const torch::Tensor& k, const torch::Tensor& v, const torch::Tensor& cache,
                   const torch::Tensor& slot_mapping) const {
    TORCH_CHECK(cache.is_contiguous() && cache.scalar_type() == k.scalar_type(), "Decoder: cache dtype/layout");
    const int64_t T = k.size(0), row = KVH_ * D_, nslots = cache.size(1) * cache.size(2);
    const int64_t esz = k.element_size();
    const int64_t* slots = slot_mapping.data_ptr<int64_t>();
    char* kc = static_cast<char*>(cache.data_ptr());
    char* vc = kc + nslots * row * esz;
    const char* kp = static_cast<const char*>(k.data_ptr());
    const char* vp = static_cast<const char*>(v.data_ptr());
    for (int64_t t = 0; t < T; ++t) {
      TORCH_CHECK(slots[t] >= 0 && slots[t] < nslots, "Decoder: slot out of range");
      std::memcpy(kc + slots[t] * row * esz, kp + t * k.stride(0) * esz, row * esz);
      std::memcpy(vc + slots[t] * row * esz, vp + t * v.stride(0) * esz, row * esz);
    }
  }

  int64_t H_, KVH_, D_;
  double eps_, scale_;
  torch::Tensor final_norm_;
  int64_t max_f32_, max_bf16_, max_i8_;
  bool native_bf16_;  // the CPU multiplies bfloat16 natively (AVX512-BF16, AMX): linear.py's native_bf16
  std::vector<LayerWeights> layers_;
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("available", &available, "True when built with AVX-512");
  m.def("linear", &linear, "y = x w^T (* scale) (+ bias), weights read once", py::arg("x"), py::arg("w"),
        py::arg("scale") = py::none(), py::arg("bias") = py::none());
  m.def("paged_attention", &paged_attention, "attention over the paged KV cache, varlen rows");
  m.def("rms_norm", &rms_norm, "HF-style RMSNorm");
  m.def("rope_", &rope_, "rotate-half RoPE in place");
  m.def("silu_mul", &silu_mul, "silu(gate) * up");
  py::class_<Decoder>(m, "Decoder")
      .def(py::init<int64_t, int64_t, int64_t, double, double, torch::Tensor, int64_t, int64_t, int64_t, bool>())
      .def("add_layer", &Decoder::add_layer)
      .def("num_layers", &Decoder::num_layers)
      .def("forward", &Decoder::forward, py::call_guard<py::gil_scoped_release>());
}
