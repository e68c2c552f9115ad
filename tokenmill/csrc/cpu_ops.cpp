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

#include <algorithm>
#include <cmath>
#include <cstring>
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

template <typename W, int M>
void linear_tile(const W* w, const float* x, const float* scale, const float* bias, float* y, int64_t N,
                 int64_t K) {
  // Threads split the output channels, so each weight row is read by one thread, once.
  const int64_t grain = std::max<int64_t>(16, N / (4 * at::get_num_threads()) + 1);
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
    float r[M];
    for (int64_t n = n0; n < n1; ++n) {
      dot_rows<W, M>(w + n * K, x, K, r);
      const float s = scale ? scale[n] : 1.0f;
      const float b = bias ? bias[n] : 0.0f;
      for (int m = 0; m < M; ++m) y[m * N + n] = r[m] * s + b;
    }
  });
}

template <typename W>
void linear_impl(const W* w, const float* x, const float* scale, const float* bias, float* y, int64_t M,
                 int64_t N, int64_t K) {
  // Tiles of up to 4 rows of x share each pass over the weights.
  for (int64_t m0 = 0; m0 < M; m0 += 4) {
    const float* xt = x + m0 * K;
    float* yt = y + m0 * N;
    switch (std::min<int64_t>(4, M - m0)) {
      case 1: linear_tile<W, 1>(w, xt, scale, bias, yt, N, K); break;
      case 2: linear_tile<W, 2>(w, xt, scale, bias, yt, N, K); break;
      case 3: linear_tile<W, 3>(w, xt, scale, bias, yt, N, K); break;
      default: linear_tile<W, 4>(w, xt, scale, bias, yt, N, K); break;
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
  const torch::Tensor xf = x.to(at::kFloat).contiguous();
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
#ifdef TM_AVX512
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

template <typename T>
inline float dot_head(const T* k, const float* q, int64_t D) {
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
template <typename T>
inline void axpy_head(float p, const T* v, float* out, int64_t D) {
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

// In place: s[0:L] = softmax(s[0:L]).
inline void softmax_inplace(float* s, int64_t L) {
  __m512 vmax = _mm512_set1_ps(-INFINITY);
  int64_t i = 0;
  for (; i + 16 <= L; i += 16) vmax = _mm512_max_ps(vmax, _mm512_loadu_ps(s + i));
  if (i < L) vmax = _mm512_mask_max_ps(vmax, static_cast<__mmask16>((1u << (L - i)) - 1), vmax, _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << (L - i)) - 1), s + i));
  const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(vmax));
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
  const __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(vsum));
  for (i = 0; i + 16 <= L; i += 16) _mm512_storeu_ps(s + i, _mm512_mul_ps(_mm512_loadu_ps(s + i), inv));
  if (i < L) {
    const __mmask16 mask = static_cast<__mmask16>((1u << (L - i)) - 1);
    _mm512_mask_storeu_ps(s + i, mask, _mm512_mul_ps(_mm512_maskz_loadu_ps(mask, s + i), inv));
  }
}

// out[0:16*NV] = sum over keys of p[i] * v_i, the accumulator held in registers (no read-modify-
// write of out per key, which made the value pass latency-bound on the store-load chain).
template <typename T, int NV>
inline void weighted_values(const float* p, const T* vc, const int64_t* table, int64_t block_size, int64_t blk_stride,
                            int64_t tok_stride, int64_t off, int64_t lo, int64_t hi, float* out) {
  __m512 acc[NV];
  for (int j = 0; j < NV; ++j) acc[j] = _mm512_setzero_ps();
  for (int64_t t = lo; t < hi;) {
    const int64_t o = t % block_size, n = std::min(block_size - o, hi - t);
    const T* vp = vc + table[t / block_size] * blk_stride + o * tok_stride + off;
    for (int64_t i = 0; i < n; ++i, vp += tok_stride) {
      const __m512 pv = _mm512_set1_ps(p[t + i - lo]);
      for (int j = 0; j < NV; ++j) acc[j] = _mm512_fmadd_ps(pv, load16(vp + 16 * j), acc[j]);
    }
    t += n;
  }
  for (int j = 0; j < NV; ++j) _mm512_storeu_ps(out + 16 * j, acc[j]);
}

// One work item: the G query heads of one kv head for one query row, over keys [lo, hi).
// Scores for all keys first (one pass over K, scores laid out per head), a vectorized softmax
// per head, then the values.
template <typename T>
void attend(const float* q, const T* kc, const T* vc, const int64_t* table, int64_t block_size, int64_t kvh,
            int64_t KVH, int64_t D, int64_t G, int64_t lo, int64_t hi, float scale, float* out,
            std::vector<float>& scores) {
  const int64_t L = hi - lo;
  scores.resize(static_cast<size_t>(L * G));
  const int64_t tok_stride = KVH * D;
  const int64_t blk_stride = block_size * tok_stride;
  // Walk the keys block by block: one division per block, not per key.
  for (int64_t t = lo; t < hi;) {
    const int64_t off = t % block_size, n = std::min(block_size - off, hi - t);
    const T* kp = kc + table[t / block_size] * blk_stride + off * tok_stride + kvh * D;
    for (int64_t i = 0; i < n; ++i, kp += tok_stride)
      for (int64_t g = 0; g < G; ++g) scores[g * L + (t + i - lo)] = dot_head(kp, q + g * D, D) * scale;
    t += n;
  }
  for (int64_t g = 0; g < G; ++g) softmax_inplace(scores.data() + g * L, L);
  for (int64_t g = 0; g < G; ++g) {
    const float* p = scores.data() + g * L;
    float* o = out + g * D;
    switch (D) {
      case 16: weighted_values<T, 1>(p, vc, table, block_size, blk_stride, tok_stride, kvh * D, lo, hi, o); break;
      case 32: weighted_values<T, 2>(p, vc, table, block_size, blk_stride, tok_stride, kvh * D, lo, hi, o); break;
      case 48: weighted_values<T, 3>(p, vc, table, block_size, blk_stride, tok_stride, kvh * D, lo, hi, o); break;
      case 64: weighted_values<T, 4>(p, vc, table, block_size, blk_stride, tok_stride, kvh * D, lo, hi, o); break;
      case 96: weighted_values<T, 6>(p, vc, table, block_size, blk_stride, tok_stride, kvh * D, lo, hi, o); break;
      case 128: weighted_values<T, 8>(p, vc, table, block_size, blk_stride, tok_stride, kvh * D, lo, hi, o); break;
      default:
        std::fill(o, o + D, 0.0f);
        for (int64_t t = lo; t < hi; ++t) {
          const T* vp = vc + table[t / block_size] * blk_stride + (t % block_size) * tok_stride + kvh * D;
          axpy_head(p[t - lo], vp, o, D);
        }
    }
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
  TORCH_CHECK(qsl[B] == T, "paged_attention: query_start_loc[-1] must equal the number of query rows");
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(lens[b] >= qsl[b + 1] - qsl[b] && qsl[b + 1] >= qsl[b], "paged_attention: sequence ", b,
                " has more query rows than context");
  // Work items: (row, kv head); the row's sequence is found by a binary search over qsl.
  torch::Tensor out = torch::empty({T, H, D}, q.options().dtype(at::kFloat));
#ifdef TM_AVX512
  const float* qp = qf.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t* tp = tables.data_ptr<int64_t>();
  const int64_t max_blocks = tables.size(1);
  const float sc = static_cast<float>(scale);
  at::parallel_for(0, T * KVH, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> scores;
    for (int64_t item = i0; item < i1; ++item) {
      const int64_t row = item / KVH, kvh = item % KVH;
      const int64_t b = std::upper_bound(qsl, qsl + B + 1, row) - qsl - 1;
      const int64_t q_len = qsl[b + 1] - qsl[b];
      const int64_t pos = lens[b] - q_len + (row - qsl[b]);
      const int64_t hi = pos + 1;
      const int64_t lo = window > 0 ? std::max<int64_t>(0, hi - window) : 0;
      const int64_t* table = tp + b * max_blocks;
      const float* qrow = qp + (row * H + kvh * G) * D;
      float* orow = op + (row * H + kvh * G) * D;
      if (k_cache.scalar_type() == at::kFloat)
        attend(qrow, k_cache.data_ptr<float>(), v_cache.data_ptr<float>(), table, block_size, kvh, KVH, D, G, lo, hi,
               sc, orow, scores);
      else
        attend(qrow, k_cache.data_ptr<at::BFloat16>(), v_cache.data_ptr<at::BFloat16>(), table, block_size, kvh,
               KVH, D, G, lo, hi, sc, orow, scores);
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
torch::Tensor silu_mul(const torch::Tensor& gate_up) {
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.size(1) % 2 == 0 && gate_up.is_contiguous(), "silu_mul: bad input");
  const int64_t T = gate_up.size(0), I = gate_up.size(1) / 2;
  torch::Tensor out = torch::empty({T, I}, gate_up.options());
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, gate_up.scalar_type(), "silu_mul", [&] {
    const scalar_t* gp = gate_up.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, T, 8, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t)
        for (int64_t i = 0; i < I; ++i) {
          const float g = static_cast<float>(gp[t * 2 * I + i]);
          const scalar_t act = static_cast<scalar_t>(g / (1.0f + std::exp(-g)));
          op[t * I + i] = act * gp[t * 2 * I + I + i];
        }
    });
  });
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("available", &available, "True when built with AVX-512");
  m.def("linear", &linear, "y = x w^T (* scale) (+ bias), weights read once", py::arg("x"), py::arg("w"),
        py::arg("scale") = py::none(), py::arg("bias") = py::none());
  m.def("paged_attention", &paged_attention, "attention over the paged KV cache, varlen rows");
  m.def("rms_norm", &rms_norm, "HF-style RMSNorm");
  m.def("rope_", &rope_, "rotate-half RoPE in place");
  m.def("silu_mul", &silu_mul, "silu(gate) * up");
}
