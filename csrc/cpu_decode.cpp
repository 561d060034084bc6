// One decode step of a dense Llama/Qwen-shaped Megatron model on the CPU, in one call.
//
// Why this exists: at decode shapes a step of a small model costs what its ~110 eager torch calls dispatch, not
// what its matmuls compute. Here the matmuls stay ATen's (MKL sgemm: nothing faster is written by hand) and every
// other op of the step -- embedding gather, RMSNorm, RoPE, the K/V cache write, attention over the cache, SwiGLU,
// the residual adds -- is a plain loop the compiler vectorises, so a step is ~9 GEMM calls plus a few loops.
// Arithmetic follows megatron_r1/inference/functional.py (and so Megatron-Core) op for op, up to rounding: the
// exp below is a polynomial (exact to ~2 ulp), and sums are reassociated.
//
// Layouts (functional.py's KVCache / FunctionalGPT): QKV output per token is [kv_heads, g + 2, head_dim] (g query
// heads of a group, then its K, then its V); the cache is [slots, kv_heads, seq, 2 * head_dim] (K and V side by
// side); bias is [slots, seq], additive (0 where a row may attend, -inf beyond); cos / sin are [seq, head_dim]
// RoPE tables with the rotate-half sign folded into sin.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

// exp(x) for float, written so that `#pragma omp simd` loops vectorise it (libm's expf does not vectorise
// without -ffast-math, and a step runs ~30k of them): Cody-Waite range reduction x = n ln2 + r and Cephes'
// degree-6 polynomial for e^r on [-ln2/2, ln2/2]; relative error ~2e-7. Below -87.3 (-inf included) it returns
// 0, above 88.3 e^88.3 (near the float maximum). No branches and no floorf (GCC vectorises neither without
// -ffast-math): the clamps are min/max, and n = round(x log2 e) comes from adding and removing 1.5 * 2^23.
static inline float exp_poly(float x) {
  const float hi = 88.3f, lo = -87.3f;
  const float xc = std::min(std::max(x, lo), hi);
  const float n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  float r = xc - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  const float scale = __builtin_bit_cast(float, bits);
  return x < lo ? 0.0f : p * scale;
}

// out[i] = x[i] / sqrt(mean(x^2) + eps) * w[i] for each of `rows` rows of width d (local_layers.RMSNorm).
void rms_norm_rows(const float* x, const float* w, float eps, float* out, int64_t rows, int64_t d) {
  for (int64_t b = 0; b < rows; ++b) {
    const float* xr = x + b * d;
    float* o = out + b * d;
    float ss = 0.f;
#pragma omp simd reduction(+ : ss)
    for (int64_t i = 0; i < d; ++i) ss += xr[i] * xr[i];
    const float inv = 1.0f / std::sqrt(ss / static_cast<float>(d) + eps);
#pragma omp simd
    for (int64_t i = 0; i < d; ++i) o[i] = xr[i] * inv * w[i];
  }
}

// x * cos + cat(x2, x1) * signed_sin over one head of width hd (Megatron's rotate-half RoPE), in place.
inline void rope_head(float* x, const float* cos, const float* sin, int64_t hd, float* tmp) {
  const int64_t half = hd / 2;
  for (int64_t i = 0; i < hd; ++i) tmp[i] = x[i];
#pragma omp simd
  for (int64_t i = 0; i < half; ++i) x[i] = tmp[i] * cos[i] + tmp[i + half] * sin[i];
#pragma omp simd
  for (int64_t i = half; i < hd; ++i) x[i] = tmp[i] * cos[i] + tmp[i - half] * sin[i];
}

#if defined(__AVX2__) && defined(__FMA__)
// Sums of 8 vectors, one per lane: [sum(v0), ..., sum(v7)] in 6 hadds (a horizontal sum per vector would be a
// serial chain of adds, the cost of a short dot product).
static inline __m256 hsum8(__m256 v0, __m256 v1, __m256 v2, __m256 v3, __m256 v4, __m256 v5, __m256 v6, __m256 v7) {
  const __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(v0, v1), _mm256_hadd_ps(v2, v3));
  const __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(v4, v5), _mm256_hadd_ps(v6, v7));
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

template <int HD>
static inline __m256 dot_partial(const float* q, const float* k) {
  __m256 acc = _mm256_mul_ps(_mm256_loadu_ps(q), _mm256_loadu_ps(k));
  for (int c = 8; c < HD; c += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + c), _mm256_loadu_ps(k + c), acc);
  return acc;
}
#endif

// s[l] = scale * (q . K[l]) + bias[l] for l < L; K rows are the cache's [seq, 2 * hd] entries (K first).
template <int HD>
void qk_scores(const float* q, const float* kv, int64_t hd_rt, int64_t L, float scale, const float* bias, float* s) {
  const int64_t hd = HD ? HD : hd_rt;
  int64_t l = 0;
#if defined(__AVX2__) && defined(__FMA__)
  if constexpr (HD > 0 && HD % 8 == 0) {
    const int64_t st = 2 * HD;
    const __m256 sc = _mm256_set1_ps(scale);
    for (; l + 8 <= L; l += 8) {
      const float* k = kv + l * st;
      const __m256 d = hsum8(dot_partial<HD>(q, k), dot_partial<HD>(q, k + st), dot_partial<HD>(q, k + 2 * st),
                             dot_partial<HD>(q, k + 3 * st), dot_partial<HD>(q, k + 4 * st),
                             dot_partial<HD>(q, k + 5 * st), dot_partial<HD>(q, k + 6 * st),
                             dot_partial<HD>(q, k + 7 * st));
      _mm256_storeu_ps(s + l, _mm256_fmadd_ps(d, sc, _mm256_loadu_ps(bias + l)));
    }
  }
#endif
  for (; l < L; ++l) {
    const float* k = kv + l * 2 * hd;
    float dot = 0.f;
#pragma omp simd reduction(+ : dot)
    for (int64_t i = 0; i < hd; ++i) dot += q[i] * k[i];
    s[l] = dot * scale + bias[l];
  }
}

// out[h] = sum_l p[h, l] V[l] / sum_l p[h, l] for the g heads of a group (V rows read once for all g heads).
// Positions live in blocks of `bs` entries: position l is entry l % bs of blk[l / bs] (one block of the whole
// row for the contiguous cache, the row's block table for the paged one).
template <int HD>
void pv_sum(const float* p, const float* const* blk, int64_t bs, int64_t g, int64_t hd_rt, int64_t L, float* out) {
  const int64_t hd = HD ? HD : hd_rt;
  constexpr int W = HD ? HD : 1024;
  for (int64_t h0 = 0; h0 < g; h0 += 2) {  // two heads at a time: their accumulators stay in registers
    const int64_t nh = std::min<int64_t>(2, g - h0);
    const float* p0 = p + h0 * L;
    const float* p1 = p0 + (nh > 1 ? L : 0);
    float a0[W], a1[W];
    for (int64_t i = 0; i < hd; ++i) a0[i] = a1[i] = 0.f;
    for (int64_t k = 0, l0 = 0; l0 < L; ++k, l0 += bs) {
      const int64_t n = std::min(bs, L - l0);
      for (int64_t j = 0; j < n; ++j) {
        const float* v = blk[k] + j * 2 * hd + hd;
        const float w0 = p0[l0 + j], w1 = p1[l0 + j];
#pragma omp simd
        for (int64_t i = 0; i < hd; ++i) {
          a0[i] += w0 * v[i];
          a1[i] += w1 * v[i];
        }
      }
    }
    float s0 = 0.f, s1 = 0.f;
    for (int64_t l = 0; l < L; ++l) {
      s0 += p0[l];
      s1 += p1[l];
    }
    const float i0 = 1.0f / s0, i1 = 1.0f / s1;
    float* o = out + h0 * hd;
    for (int64_t i = 0; i < hd; ++i) o[i] = a0[i] * i0;
    if (nh > 1)
      for (int64_t i = 0; i < hd; ++i) o[hd + i] = a1[i] * i1;
  }
}

// Attention of one (row, KV head) group: RoPE on its g query heads and its K, the new K/V written at the row's
// position, then each query head attends to cache positions 0..L-1 (masked by the row's bias). HD is the head
// width when known at compile time (the dot products then unroll into a few FMAs), 0 for any width `hd`.
// The row's entries are in blocks of `bs` positions (see pv_sum): the paged cache walks its block table here,
// with no gather of the blocks into a contiguous copy.
template <int HD>
void attend_group(float* grp, int64_t p, const float* cos, const float* sin, float* const* blk, int64_t bs,
                  const float* brow, float* out, int64_t g, int64_t hd_rt, int64_t L, float scale, float* s,
                  float* tmp) {
  const int64_t hd = HD ? HD : hd_rt;
  for (int64_t h = 0; h <= g; ++h) rope_head(grp + h * hd, cos + p * hd, sin + p * hd, hd, tmp);
  std::memcpy(blk[p / bs] + (p % bs) * 2 * hd, grp + g * hd, 2 * hd * sizeof(float));  // K (roped) and V
  for (int64_t h = 0; h < g; ++h) {
    float* sh = s + h * L;
    for (int64_t k = 0, l0 = 0; l0 < L; ++k, l0 += bs)
      qk_scores<HD>(grp + h * hd, blk[k], hd, std::min(bs, L - l0), scale, brow + l0, sh + l0);
    float mx = -std::numeric_limits<float>::infinity();
    for (int64_t l = 0; l < L; ++l) mx = std::max(mx, sh[l]);
#pragma omp simd
    for (int64_t l = 0; l < L; ++l) sh[l] = exp_poly(sh[l] - mx);  // softmax numerators; pv_sum normalises
  }
  pv_sum<HD>(s, blk, bs, g, hd, L, out);
}

// attend_group over every (row, KV head) of rows 0..B-1. qkv [B, kvh, g + 2, hd] is roped in place; out
// [B, kvh, g, hd] is Megatron's head order. Contiguous cache (`table` null): [rows, kvh, S, 2 * hd] from the
// first row's entry; paged: the pool [blocks, kvh, bs, 2 * hd] and each row's block ids in `table` [B, tstride].
void attend_rows(float* qkv, const int64_t* pos, const float* cos, const float* sin, float* cache,
                 const int64_t* table, int64_t tstride, int64_t bs, const float* bias, float* out, int64_t B,
                 int64_t kvh, int64_t g, int64_t hd, int64_t S, int64_t L, float scale) {
  std::vector<float> s(g * L), tmp(hd);
  std::vector<float*> blk(table ? (L + bs - 1) / bs : 1);
  for (int64_t bj = 0; bj < B * kvh; ++bj) {
    const int64_t b = bj / kvh, j = bj % kvh;
    // Each row attends over its own length, not the step's longest: past it the bias is -inf, so those positions
    // add exactly nothing (at R1's long-tailed lengths most of a step's longest-length attention is such padding).
    const int64_t Lb = pos[b] + 1, nb = table ? (Lb + bs - 1) / bs : 1;
    float* grp = qkv + bj * (g + 2) * hd;
    if (table) {
      for (int64_t k = 0; k < nb; ++k) blk[k] = cache + (table[b * tstride + k] * kvh + j) * bs * 2 * hd;
    } else {
      blk[0] = cache + bj * S * 2 * hd;  // [seq, 2 * hd] of this row and KV head
    }
    float* const* bp = blk.data();
    const int64_t w = table ? bs : S;
    float* o = out + bj * g * hd;
    const float* brow = bias + b * S;
    switch (hd) {
      case 32: attend_group<32>(grp, pos[b], cos, sin, bp, w, brow, o, g, hd, Lb, scale, s.data(), tmp.data()); break;
      case 64: attend_group<64>(grp, pos[b], cos, sin, bp, w, brow, o, g, hd, Lb, scale, s.data(), tmp.data()); break;
      case 128:
        attend_group<128>(grp, pos[b], cos, sin, bp, w, brow, o, g, hd, Lb, scale, s.data(), tmp.data());
        break;
      default: attend_group<0>(grp, pos[b], cos, sin, bp, w, brow, o, g, hd, Lb, scale, s.data(), tmp.data());
    }
  }
}

// act[b, i] = silu(gate[b, i]) * up[b, i] with fc1's output [B, 2F] = [gate | up].
void swiglu_rows(const float* f, float* act, int64_t B, int64_t F) {
  for (int64_t b = 0; b < B; ++b) {
    const float* gate = f + b * 2 * F;
    const float* up = gate + F;
    float* a = act + b * F;
#pragma omp simd
    for (int64_t i = 0; i < F; ++i) a[i] = gate[i] / (1.0f + exp_poly(-gate[i])) * up[i];
  }
}

// y = x @ w.T, + bias when given (defined and non-empty), + y when `accumulate` (a residual add riding on the
// matmul: beta = 1). MKL sgemm underneath.
void linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias, at::Tensor& y, bool accumulate) {
  if (accumulate) {
    y.addmm_(x, w.t());
  } else if (bias.defined() && bias.numel()) {
    at::addmm_out(y, bias, x, w.t());
  } else {
    at::mm_out(y, x, w.t());
  }
}

struct Step {  // one decode step's inputs (see dense_decode)
  const int64_t* tok;
  const int64_t* pos;
  const at::Tensor& embed_w;
  const std::vector<at::Tensor>& layers;
  const std::vector<double>& eps;
  const at::Tensor& final_norm_w;
  const at::Tensor& out_w;
  const std::vector<at::Tensor>& caches;
  const int64_t* table;  // paged: block ids [rows, tstride]; null: contiguous rows
  int64_t tstride, bs;
  float* bias;
  const float* cos;
  const float* sin;
  int64_t kvh, g, hd, S, L;
  float scale;
};

// The whole step for cache rows r0..r1-1, logits into rows r0..r1-1 of `logits`. Rows are independent in a
// decode step (each writes only its own cache rows or blocks: the paged cache gives a row a private copy of a
// shared block before it writes there), so blocks of rows run on different threads with
// no synchronisation inside the step.
void decode_rows(const Step& st, int64_t r0, int64_t r1, at::Tensor& logits) {
  const int64_t n = r1 - r0, h = st.embed_w.size(1), S = st.S, kvh = st.kvh, g = st.g, hd = st.hd;
  const int64_t n_layers = static_cast<int64_t>(st.caches.size());
  auto opts = st.embed_w.options();
  at::Tensor x = at::empty({n, h}, opts), hn = at::empty({n, h}, opts);
  at::Tensor attn = at::empty({n, kvh * g * hd}, opts);
  float* xp = x.data_ptr<float>();
  const float* ew = st.embed_w.data_ptr<float>();
  for (int64_t b = r0; b < r1; ++b) {
    std::memcpy(xp + (b - r0) * h, ew + st.tok[b] * h, h * sizeof(float));
    st.bias[b * S + st.pos[b]] = 0.f;  // the new token is visible from now on
  }
  const at::Tensor none;
  for (int64_t i = 0; i < n_layers; ++i) {
    const at::Tensor* w = st.layers.data() + 7 * i;  // in norm, qkv, qkv bias, proj, mlp norm, fc1, fc2
    rms_norm_rows(xp, w[0].data_ptr<float>(), static_cast<float>(st.eps[2 * i]), hn.data_ptr<float>(), n, h);
    at::Tensor qkv = at::empty({n, w[1].size(0)}, opts);
    linear(hn, w[1], w[2], qkv, false);
    float* cache = st.caches[i].data_ptr<float>() + (st.table ? 0 : r0 * kvh * S * 2 * hd);
    attend_rows(qkv.data_ptr<float>(), st.pos + r0, st.cos, st.sin, cache,
                st.table ? st.table + r0 * st.tstride : nullptr, st.tstride, st.bs, st.bias + r0 * S,
                attn.data_ptr<float>(), n, kvh, g, hd, S, st.L, st.scale);
    linear(attn, w[3], none, x, true);
    rms_norm_rows(xp, w[4].data_ptr<float>(), static_cast<float>(st.eps[2 * i + 1]), hn.data_ptr<float>(), n, h);
    at::Tensor f = at::empty({n, w[5].size(0)}, opts);
    linear(hn, w[5], none, f, false);
    const int64_t F = f.size(1) / 2;
    at::Tensor act = at::empty({n, F}, opts);
    swiglu_rows(f.data_ptr<float>(), act.data_ptr<float>(), n, F);
    linear(act, w[6], none, x, true);
  }
  rms_norm_rows(xp, st.final_norm_w.data_ptr<float>(), static_cast<float>(st.eps[2 * n_layers]),
                hn.data_ptr<float>(), n, h);
  at::Tensor out = logits.narrow(0, r0, n);
  linear(hn, st.out_w, none, out, false);
}

void check_f32(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous(), "cpu_decode: ", what,
              " must be a contiguous float32 CPU tensor, got ", t.scalar_type(), " on ", t.device(),
              t.is_contiguous() ? "" : " (not contiguous)");
}

}  // namespace

// One decode step for cache rows 0..B-1: tokens [B] at positions pos [B] -> logits [B, V].
// `layers` holds 7 tensors per layer: input norm w, QKV w [(g+2)*kvh*hd, h], QKV bias (empty when none), output
// projection w [h, H*hd], pre-MLP norm w, fc1 w [2F, h], fc2 w [h, F]; `eps` one value per norm (2 per layer,
// then the final norm). `caches` one [slots, kvh, seq, 2*hd] tensor per layer; bias [slots, seq] is updated
// (the new positions become visible). Paged cache: `block_table` [>= B, max blocks] int64 holds each row's block
// ids and `caches` are the pools [blocks, kvh, block_size, 2*hd]; an empty table means contiguous rows.
at::Tensor dense_decode(const at::Tensor& tokens, const at::Tensor& pos, const at::Tensor& embed_w,
                        const std::vector<at::Tensor>& layers, const std::vector<double>& eps,
                        const at::Tensor& final_norm_w, const at::Tensor& out_w, const std::vector<at::Tensor>& caches,
                        const at::Tensor& bias, const at::Tensor& cos, const at::Tensor& sin, int64_t kvh, int64_t g,
                        int64_t hd, double scale, const at::Tensor& block_table, int64_t block_size) {
  const int64_t n_layers = static_cast<int64_t>(caches.size());
  const bool paged = block_table.defined() && block_table.numel() > 0;
  if (paged)
    TORCH_CHECK(block_table.scalar_type() == at::kLong && block_table.is_contiguous() && block_table.dim() == 2 &&
                    block_table.device().is_cpu() && block_table.size(0) >= tokens.size(0) && block_size > 0 &&
                    block_table.size(1) * block_size >= bias.size(1),
                "cpu_decode: block_table must be a contiguous int64 CPU tensor [>= batch, blocks covering the "
                "context] with block_size > 0");
  TORCH_CHECK(static_cast<int64_t>(layers.size()) == 7 * n_layers, "cpu_decode: expected 7 tensors per layer");
  TORCH_CHECK(static_cast<int64_t>(eps.size()) == 2 * n_layers + 1, "cpu_decode: expected 2 eps per layer + 1");
  TORCH_CHECK(tokens.scalar_type() == at::kLong && pos.scalar_type() == at::kLong && tokens.is_contiguous() &&
                  pos.is_contiguous() && tokens.device().is_cpu() && pos.device().is_cpu(),
              "cpu_decode: tokens and pos must be contiguous int64 CPU tensors");
  check_f32(embed_w, "embedding weight");
  check_f32(bias, "attention bias");
  check_f32(cos, "rope cos");
  check_f32(sin, "rope sin");
  check_f32(final_norm_w, "final norm weight");
  check_f32(out_w, "output weight");
  const int64_t B = tokens.size(0), h = embed_w.size(1), V = embed_w.size(0);
  const int64_t S = bias.size(1);
  TORCH_CHECK(pos.size(0) == B && B <= bias.size(0), "cpu_decode: batch ", B, " vs ", bias.size(0), " cache rows");
  TORCH_CHECK(cos.size(0) == S && cos.size(1) == hd && sin.sizes() == cos.sizes(), "cpu_decode: rope table shape");
  TORCH_CHECK(final_norm_w.size(0) == h && out_w.size(1) == h, "cpu_decode: output weight shape");
  for (int64_t i = 0; i < n_layers; ++i) {
    const at::Tensor* w = layers.data() + 7 * i;
    const char* names[7] = {"input norm weight", "QKV weight", "", "output projection weight",
                            "pre-MLP norm weight", "fc1 weight", "fc2 weight"};
    for (int k = 0; k < 7; ++k)
      if (k != 2) check_f32(w[k], names[k]);
    TORCH_CHECK(w[2].numel() == 0 || (w[2].is_contiguous() && w[2].scalar_type() == at::kFloat &&
                                      w[2].numel() == w[1].size(0)),
                "cpu_decode: QKV bias must be empty or a float32 vector of the QKV width");
    TORCH_CHECK(w[0].size(0) == h && w[4].size(0) == h && w[1].size(0) == kvh * (g + 2) * hd && w[1].size(1) == h &&
                    w[3].size(0) == h && w[3].size(1) == kvh * g * hd && w[5].size(1) == h &&
                    w[6].size(0) == h && w[6].size(1) * 2 == w[5].size(0),
                "cpu_decode: layer ", i, " weight shapes do not match hidden ", h, ", ", kvh, " KV heads x ", g,
                " queries x head_dim ", hd);
    const at::Tensor& cache = caches[i];
    check_f32(cache, "KV cache");
    TORCH_CHECK(cache.dim() == 4 && cache.size(1) == kvh && cache.size(3) == 2 * hd &&
                    (paged ? cache.size(2) == block_size : cache.size(0) >= B && cache.size(2) == S),
                "cpu_decode: layer ", i, " cache shape ", cache.sizes());
  }
  const int64_t* tok = tokens.data_ptr<int64_t>();
  const int64_t* ps = pos.data_ptr<int64_t>();
  int64_t L = 0;
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(tok[b] >= 0 && tok[b] < V, "cpu_decode: token id ", tok[b], " outside the vocabulary of ", V);
    TORCH_CHECK(ps[b] >= 0 && ps[b] < S, "cpu_decode: position ", ps[b], " outside the cache of ", S);
    L = std::max(L, ps[b] + 1);
  }
  const int64_t* table = paged ? block_table.data_ptr<int64_t>() : nullptr;
  if (paged) {  // every block a row reads must exist in the pool
    const int64_t nb = (L + block_size - 1) / block_size, pool = caches.empty() ? 0 : caches[0].size(0);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t k = 0; k < nb; ++k)
        TORCH_CHECK(table[b * block_table.size(1) + k] >= 0 && table[b * block_table.size(1) + k] < pool,
                    "cpu_decode: block id ", table[b * block_table.size(1) + k], " outside the pool of ", pool);
  }
  const Step st{tok, ps, embed_w, layers, eps, final_norm_w, out_w, caches, table,
                paged ? block_table.size(1) : 0, paged ? block_size : S, bias.data_ptr<float>(),
                cos.data_ptr<float>(), sin.data_ptr<float>(), kvh, g, hd, S, L, static_cast<float>(scale)};
  at::Tensor logits = at::empty({B, out_w.size(0)}, embed_w.options());
  // Rows in blocks of at least 8 over the intra-op threads: one parallel region per step (a region per GEMM
  // costs more than it saves at these sizes), and MKL runs each block's GEMMs on its own thread.
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), B / 8));
  if (threads == 1) {
    decode_rows(st, 0, B, logits);
  } else {
    at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) decode_rows(st, t * B / threads, (t + 1) * B / threads, logits);
    });
  }
  return logits;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "megatron-r1 fused CPU decode step for dense models (see csrc/cpu_decode.cpp)";
  m.def("dense_decode", &dense_decode, "one decode step of a dense model: logits [B, V]");
}
