// CPU kernels for the engine's decoder layers, where eager torch spends more time launching small ops
// (or copying) than computing:
//   * paged decode attention: one query token per sequence, its keys and values read in place from the
//     paged KV cache (no gather into a padded batch), scores and sums in fp32;
//   * residual add + RMSNorm, RoPE + KV-cache write, SiLU(gate) * up, greedy argmax: each one pass over
//     its rows in fp32, rounded once to the model dtype, where torch takes three to eight kernels.
//
// Built at run time by tokenfab/engine/cpu_kernels.py (g++ -O3 -march=native, OpenMP) and called through
// ctypes; the engine falls back to its torch path when no compiler is present. Layouts, as the engine
// keeps them:
//   q      [batch, heads, head_dim], rows `q_stride` elements apart (a view into the fused QKV output)
//   cache  [2 * kv_heads, slots, head_dim]: K heads then V heads; slot = block * block_size + offset
//   tables [batch, table_stride] block ids; lens [batch] keys per sequence
//   out    [batch, heads, head_dim], contiguous
// Query head h attends with KV head h / (heads / kv_heads) (grouped-query attention).

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#define TF_HAVE_AVX512 1  // vectorised SiLU
#if defined(__AVX512BF16__)
#define TF_HAVE_AVX512BF16 1  // the fast decode-attention path
#endif
#endif

namespace {

inline float bf16_to_f32(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t f32_to_bf16(float f) {  // round to nearest even, as torch does
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);  // NaN stays NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

inline float load(const uint16_t* p) { return bf16_to_f32(*p); }
inline float load(const float* p) { return *p; }
inline void store(uint16_t* p, float v) { *p = f32_to_bf16(v); }
inline void store(float* p, float v) { *p = v; }

struct Problem {
  const void* q;
  int64_t q_stride;
  const void* cache;
  int64_t slots;
  const int64_t* tables;
  int64_t table_stride;
  const int64_t* lens;
  void* out;
  int64_t heads, kv_heads, head_dim, block_size;
  float scale;
};

// softmax numerator in place over n scores; returns the sum. Written as a plain loop so that the
// compiler vectorises exp (libmvec) under -ffast-math.
inline float exp_shifted(float* s, int64_t n) {
  float m = -FLT_MAX;  // -ffast-math: no infinities
  for (int64_t t = 0; t < n; ++t) m = std::max(m, s[t]);
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t t = 0; t < n; ++t) {
    s[t] = std::exp(s[t] - m);
    sum += s[t];
  }
  return sum;
}

// Any dtype, head size and block size: scalar code the compiler vectorises where it can.
template <typename T>
void task_generic(const Problem& p, int64_t b, int64_t g, std::vector<float>& sc, std::vector<float>& acc,
                  std::vector<float>& row) {
  const int64_t D = p.head_dim, rep = p.heads / p.kv_heads, L = p.lens[b], bs = p.block_size;
  const T* q = static_cast<const T*>(p.q) + b * p.q_stride + g * rep * D;
  const T* kbase = static_cast<const T*>(p.cache) + g * p.slots * D;
  const T* vbase = static_cast<const T*>(p.cache) + (p.kv_heads + g) * p.slots * D;
  const int64_t* bt = p.tables + b * p.table_stride;
  sc.resize(rep * L);
  acc.assign(rep * D, 0.f);
  row.resize(rep * D + D);
  float* qf = row.data();
  float* kf = row.data() + rep * D;
  for (int64_t i = 0; i < rep * D; ++i) qf[i] = load(q + i) * p.scale;
  for (int64_t t = 0; t < L; ++t) {
    const T* k = kbase + (bt[t / bs] * bs + t % bs) * D;
    for (int64_t d = 0; d < D; ++d) kf[d] = load(k + d);
    for (int64_t r = 0; r < rep; ++r) {
      float s = 0.f;
#pragma omp simd reduction(+ : s)
      for (int64_t d = 0; d < D; ++d) s += qf[r * D + d] * kf[d];
      sc[r * L + t] = s;
    }
  }
  std::vector<float> inv(rep);
  for (int64_t r = 0; r < rep; ++r) inv[r] = 1.f / exp_shifted(&sc[r * L], L);
  for (int64_t t = 0; t < L; ++t) {
    const T* v = vbase + (bt[t / bs] * bs + t % bs) * D;
    for (int64_t d = 0; d < D; ++d) kf[d] = load(v + d);
    for (int64_t r = 0; r < rep; ++r) {
      const float w = sc[r * L + t];
      float* a = &acc[r * D];
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) a[d] += w * kf[d];
    }
  }
  T* out = static_cast<T*>(p.out) + (b * p.heads + g * rep) * D;
  for (int64_t r = 0; r < rep; ++r)
    for (int64_t d = 0; d < D; ++d) store(out + r * D + d, acc[r * D + d] * inv[r]);
}


// ---- one-pass row kernels -------------------------------------------------------------------------------
// Rows are split over threads only when there is enough work to pay for waking them.
constexpr int64_t kParallelElems = 1 << 15;

// x += delta (if given, rounded to the model dtype as torch's add would); out = x * rsqrt(mean(x^2) + eps) * w
template <typename T>
void add_rms_norm(T* x, const T* delta, const T* w, T* out, int64_t n, int64_t d, float eps) {
#pragma omp parallel for if (n * d >= kParallelElems) schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    T* xi = x + i * d;
    float ss = 0.f;
    if (delta != nullptr) {
      const T* di = delta + i * d;
      for (int64_t j = 0; j < d; ++j) {
        store(xi + j, load(xi + j) + load(di + j));
      }
    }
#pragma omp simd reduction(+ : ss)
    for (int64_t j = 0; j < d; ++j) {
      const float v = load(xi + j);
      ss += v * v;
    }
    const float r = 1.f / std::sqrt(ss / static_cast<float>(d) + eps);
    T* oi = out + i * d;
    for (int64_t j = 0; j < d; ++j) store(oi + j, load(xi + j) * r * load(w + j));
  }
}

// Rotate the first `rot_heads` heads of each token's fused QKV row in place (rotate-half layout: element i
// pairs with i + hd/2), then copy the token's K and V heads into the cache at its slot.
// qkv [n, heads + 2 * kv_heads, hd]; cos, sin [n, hd / 2] fp32; cache [2 * kv_heads, slots, hd].
template <typename T>
void rope_and_cache(T* qkv, const float* cos, const float* sin, const int64_t* slot, T* cache, int64_t n,
                    int64_t heads, int64_t kv_heads, int64_t hd, int64_t cache_slots) {
  const int64_t width = (heads + 2 * kv_heads) * hd, half = hd / 2;
#pragma omp parallel for if (n * width >= kParallelElems) schedule(static)
  for (int64_t t = 0; t < n; ++t) {
    T* row = qkv + t * width;
    const float* c = cos + t * half;
    const float* s = sin + t * half;
    for (int64_t h = 0; h < heads + kv_heads; ++h) {
      T* x = row + h * hd;
      for (int64_t i = 0; i < half; ++i) {
        const float a = load(x + i), b = load(x + i + half);
        store(x + i, a * c[i] - b * s[i]);
        store(x + i + half, b * c[i] + a * s[i]);
      }
    }
    for (int64_t g = 0; g < 2 * kv_heads; ++g)
      std::memcpy(cache + (g * cache_slots + slot[t]) * hd, row + (heads + g) * hd, hd * sizeof(T));
  }
}

#ifdef TF_HAVE_AVX512
// exp(x) for |x| < ~87 as 2^n * p(f): n = round(x log2 e), f = x - n ln 2 in two parts, p of degree 6
// (relative error ~2e-7, below bf16's 4e-3 by far); inputs clamped so that exp(-big) -> 0, not garbage.
inline __m512 exp512(__m512 x) {
  x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.f)), _mm512_set1_ps(-87.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT);
  __m512 f = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145752f), x);
  f = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860677e-6f), f);
  __m512 p = _mm512_set1_ps(1.f / 720);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f / 120));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f / 24));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f / 6));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

inline __m512 load16(const uint16_t* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16_masked(const uint16_t* p, __mmask16 m) {
  const __m256i h = _mm256_maskz_loadu_epi16(m, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline __m512 load16_masked(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
// round to nearest even, as the scalar store does (NaN is not expected here)
inline void store16_masked(uint16_t* p, __m512 v, __mmask16 m) {
  __m512i u = _mm512_castps_si512(v);
  u = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1))));
  _mm256_mask_storeu_epi16(p, m, _mm512_cvtepi32_epi16(_mm512_srli_epi32(u, 16)));
}
inline void store16_masked(float* p, __m512 v, __mmask16 m) { _mm512_mask_storeu_ps(p, m, v); }
#endif

// out[i, j] = silu(gu[i, j]) * gu[i, f + j]
template <typename T>
void silu_mul(const T* gu, T* out, int64_t n, int64_t f) {
#pragma omp parallel for if (n * f >= kParallelElems) schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    const T* g = gu + i * 2 * f;
    T* o = out + i * f;
#ifdef TF_HAVE_AVX512
    for (int64_t j = 0; j < f; j += 16) {
      const __mmask16 m = f - j >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << (f - j)) - 1);
      const __m512 a = load16_masked(g + j, m), u = load16_masked(g + f + j, m);
      const __m512 sig = _mm512_div_ps(a, _mm512_add_ps(_mm512_set1_ps(1.f), exp512(_mm512_sub_ps(_mm512_setzero_ps(), a))));
      store16_masked(o + j, _mm512_mul_ps(sig, u), m);
    }
#else
#pragma omp simd
    for (int64_t j = 0; j < f; ++j) {
      const float a = load(g + j);
      // clamped: under -ffast-math an exp that overflows to inf can turn the division into NaN
      store(o + j, a / (1.f + std::exp(std::min(-a, 80.f))) * load(g + f + j));
    }
#endif
  }
}

// First index of each row's maximum: a vectorised max, then a scan for its first occurrence (the row
// is in L1/L2 by then). Built with -ffast-math: rows must be free of NaN (model logits are).
template <typename T>
void argmax_rows(const T* x, int64_t* out, int64_t n, int64_t v) {
#pragma omp parallel for if (n * v >= 4 * kParallelElems) schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    const T* r = x + i * v;
    float best = load(r);
#pragma omp simd reduction(max : best)
    for (int64_t j = 0; j < v; ++j) best = std::max(best, load(r + j));
    int64_t at = 0;
    while (at < v - 1 && load(r + at) != best) ++at;
    out[i] = at;
  }
}

#ifdef TF_HAVE_AVX512BF16
// Sixteen vectors in, one out: lane t holds the sum of the lanes of a[t].
inline __m512 sum16(const __m512* a) {
  __m512 l1[8], l2[4], l3[2];
  for (int i = 0; i < 8; ++i)
    l1[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]), _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {
    const __m512d x = _mm512_castps_pd(l1[2 * i]), y = _mm512_castps_pd(l1[2 * i + 1]);
    l2[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }
  for (int i = 0; i < 2; ++i)
    l3[i] = _mm512_add_ps(_mm512_shuffle_f32x4(l2[2 * i], l2[2 * i + 1], 0x88),
                          _mm512_shuffle_f32x4(l2[2 * i], l2[2 * i + 1], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(l3[0], l3[1], 0x88), _mm512_shuffle_f32x4(l3[0], l3[1], 0xDD));
}

// Prefetch `rows` rows of 16 * NV bf16 (whole cache lines) into L1: the blocks of a sequence lie anywhere
// in the cache, and the hardware prefetcher does not run ahead across them.
template <int NV, int Hint = _MM_HINT_T0>
inline void prefetch_rows(const uint16_t* p, int64_t rows) {
  const char* c = reinterpret_cast<const char*>(p);
  for (int64_t off = 0; off < rows * 32 * NV; off += 64) _mm_prefetch(c + off, static_cast<_mm_hint>(Hint));
}

inline const uint16_t* run_start(const uint16_t* base, const int64_t* bt, int64_t t0, int64_t bs, int64_t d) {
  return base + (bt[t0 / bs] * bs + t0 % bs) * d;
}

// Scaled q.k for the query rows of one KV head over runs of 16 keys, each run within one block
// (block_size is a multiple of 16): AVX512-BF16 dot products (exact products, fp32 sums), the sixteen
// partial-sum vectors transposed into one vector of scores. head_dim = 16 * NV.
template <int NV>
void scores(const Problem& p, const uint16_t* q, const uint16_t* kbase, const int64_t* bt, int64_t runs,
            int64_t rep, float* sc, int64_t width) {
  constexpr int64_t D = 16 * NV;
  const int64_t bs = p.block_size;
  const __m512 scale = _mm512_set1_ps(p.scale);
  prefetch_rows<NV>(run_start(kbase, bt, 0, bs, D), 16);
  for (int64_t run = 0; run < runs; ++run) {
    const int64_t t0 = run * 16;
    const uint16_t* k = run_start(kbase, bt, t0, bs, D);
    if (run + 1 < runs) prefetch_rows<NV>(run_start(kbase, bt, t0 + 16, bs, D), 16);
    for (int64_t r = 0; r < rep; ++r) {
      __m512bh qv[NV / 2];
      for (int j = 0; j < NV / 2; ++j) qv[j] = (__m512bh)_mm512_loadu_si512(q + r * D + 32 * j);
      __m512 dots[16];
      for (int t = 0; t < 16; ++t) {
        __m512 s = _mm512_setzero_ps();
        for (int j = 0; j < NV / 2; ++j) s = _mm512_dpbf16_ps(s, qv[j], (__m512bh)_mm512_loadu_si512(k + t * D + 32 * j));
        dots[t] = s;
      }
      _mm512_storeu_ps(sc + r * width + t0, _mm512_mul_ps(sum16(dots), scale));
    }
  }
}

// out[r] = inv[r] * sum_t w[r][t] v[t] for the query rows of one KV head, head_dim = 16 * NV. The
// accumulators of up to RG query rows stay in registers (RG * NV <= 16 vectors) while the values stream
// past once per group, each row converted from bf16 once.
template <int NV>
void weighted_values(const Problem& p, const uint16_t* vbase, const int64_t* bt, int64_t L, int64_t rep,
                     const float* w, int64_t width, const float* inv, uint16_t* out) {
  constexpr int RG = NV <= 4 ? 4 : (NV <= 8 ? 2 : 1);
  const int64_t bs = p.block_size;
  for (int64_t r0 = 0; r0 < rep; r0 += RG) {
    const int cnt = static_cast<int>(std::min<int64_t>(RG, rep - r0));
    __m512 acc[RG][NV];
    for (int i = 0; i < RG; ++i)
      for (int j = 0; j < NV; ++j) acc[i][j] = _mm512_setzero_ps();
    for (int64_t t0 = 0; t0 < L; t0 += bs) {  // block by block: no division per key
      const uint16_t* block = vbase + bt[t0 / bs] * bs * (16 * NV);
      const int64_t n = std::min(bs, L - t0);
      if (t0 + bs < L) prefetch_rows<NV>(vbase + bt[t0 / bs + 1] * bs * (16 * NV), std::min(bs, L - t0 - bs));
      for (int64_t u = 0; u < n; ++u) {
        const uint16_t* v = block + u * (16 * NV);
        __m512 vf[NV];
        for (int j = 0; j < NV; ++j) vf[j] = load16(v + 16 * j);
        for (int i = 0; i < RG; ++i) {
          if (i < cnt) {
            const __m512 x = _mm512_set1_ps(w[(r0 + i) * width + t0 + u]);
            for (int j = 0; j < NV; ++j) acc[i][j] = _mm512_fmadd_ps(x, vf[j], acc[i][j]);
          }
        }
      }
    }
    for (int i = 0; i < cnt; ++i) {
      const __m512 s = _mm512_set1_ps(inv[r0 + i]);
      for (int j = 0; j < NV; ++j) {
        const __m256bh h = _mm512_cvtneps_pbh(_mm512_mul_ps(acc[i][j], s));
        std::memcpy(out + (r0 + i) * 16 * NV + 16 * j, &h, 32);
      }
    }
  }
}

// bf16 with head_dim = 16 * NV a multiple of 32 (at most 256) and block_size a multiple of 16: scores
// over runs of 16 keys that lie in one block (`scores`), softmax, then the weighted values.
template <int NV>
void task_bf16(const Problem& p, int64_t b, int64_t g, std::vector<float>& sc) {
  constexpr int64_t D = 16 * NV;
  const int64_t rep = p.heads / p.kv_heads, L = p.lens[b], bs = p.block_size;
  const int64_t runs = (L + 15) / 16, width = runs * 16;
  const uint16_t* q = static_cast<const uint16_t*>(p.q) + b * p.q_stride + g * rep * D;
  const uint16_t* kbase = static_cast<const uint16_t*>(p.cache) + g * p.slots * D;
  const uint16_t* vbase = static_cast<const uint16_t*>(p.cache) + (p.kv_heads + g) * p.slots * D;
  const int64_t* bt = p.tables + b * p.table_stride;
  sc.resize(rep * width);
  prefetch_rows<NV, _MM_HINT_T1>(vbase + bt[0] * bs * D, std::min(bs, L));  // arrives while the scores are computed
  scores<NV>(p, q, kbase, bt, runs, rep, sc.data(), width);
  float inv[64];
  for (int64_t r = 0; r < rep; ++r) inv[r] = 1.f / exp_shifted(&sc[r * width], L);  // slots past L are never read
  weighted_values<NV>(p, vbase, bt, L, rep, sc.data(), width, inv,
                      static_cast<uint16_t*>(p.out) + (b * p.heads + g * rep) * D);
}

void run_bf16(const Problem& p, int64_t b, int64_t g, std::vector<float>& sc) {
  switch (p.head_dim / 16) {
    case 2: return task_bf16<2>(p, b, g, sc);
    case 4: return task_bf16<4>(p, b, g, sc);
    case 6: return task_bf16<6>(p, b, g, sc);
    case 8: return task_bf16<8>(p, b, g, sc);
    case 10: return task_bf16<10>(p, b, g, sc);
    case 12: return task_bf16<12>(p, b, g, sc);
    case 14: return task_bf16<14>(p, b, g, sc);
    default: return task_bf16<16>(p, b, g, sc);
  }
}
#endif

}  // namespace

extern "C" {

// Which code path the bf16 kernel takes on this build.
const char* tf_kernel_isa() {
#ifdef TF_HAVE_AVX512BF16
  return "avx512bf16";
#else
  return "generic";
#endif
}

// dtype: 0 = bfloat16, 1 = float32, for all below.
#define TF_DISPATCH(call_bf16, call_f32) \
  do {                                    \
    if (dtype == 0) {                     \
      call_bf16;                          \
    } else {                              \
      call_f32;                           \
    }                                     \
  } while (0)

void tf_add_rms_norm(int dtype, void* x, const void* delta, const void* w, void* out, int64_t n, int64_t d, float eps) {
  TF_DISPATCH(add_rms_norm<uint16_t>(static_cast<uint16_t*>(x), static_cast<const uint16_t*>(delta),
                                     static_cast<const uint16_t*>(w), static_cast<uint16_t*>(out), n, d, eps),
              add_rms_norm<float>(static_cast<float*>(x), static_cast<const float*>(delta),
                                  static_cast<const float*>(w), static_cast<float*>(out), n, d, eps));
}

void tf_rope_and_cache(int dtype, void* qkv, const float* cos, const float* sin, const int64_t* slot, void* cache,
                       int64_t n, int64_t heads, int64_t kv_heads, int64_t hd, int64_t cache_slots) {
  TF_DISPATCH(rope_and_cache<uint16_t>(static_cast<uint16_t*>(qkv), cos, sin, slot, static_cast<uint16_t*>(cache), n,
                                       heads, kv_heads, hd, cache_slots),
              rope_and_cache<float>(static_cast<float*>(qkv), cos, sin, slot, static_cast<float*>(cache), n, heads,
                                    kv_heads, hd, cache_slots));
}

void tf_silu_mul(int dtype, const void* gu, void* out, int64_t n, int64_t f) {
  TF_DISPATCH(silu_mul<uint16_t>(static_cast<const uint16_t*>(gu), static_cast<uint16_t*>(out), n, f),
              silu_mul<float>(static_cast<const float*>(gu), static_cast<float*>(out), n, f));
}

void tf_argmax_rows(int dtype, const void* x, int64_t* out, int64_t n, int64_t v) {
  TF_DISPATCH(argmax_rows<uint16_t>(static_cast<const uint16_t*>(x), out, n, v),
              argmax_rows<float>(static_cast<const float*>(x), out, n, v));
}

// dtype: 0 = bfloat16, 1 = float32. Returns 0, or -1 for a shape it does not take (the caller checks first).
int tf_decode_attention(int dtype, const void* q, int64_t q_stride, const void* cache, int64_t slots,
                        const int64_t* tables, int64_t table_stride, const int64_t* lens, void* out, int64_t batch,
                        int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t block_size, float scale) {
  if (kv_heads <= 0 || heads % kv_heads || heads / kv_heads > 64 || head_dim <= 0 || block_size <= 0) return -1;
  const Problem p{q, q_stride, cache, slots, tables, table_stride, lens, out, heads, kv_heads, head_dim, block_size, scale};
#ifdef TF_HAVE_AVX512BF16
  const bool fast = dtype == 0 && head_dim % 32 == 0 && head_dim <= 256 && block_size % 16 == 0;
#else
  const bool fast = false;
#endif
  const int64_t tasks = batch * kv_heads;
#pragma omp parallel
  {
    std::vector<float> sc, acc, row;
#pragma omp for schedule(dynamic, 4)
    for (int64_t i = 0; i < tasks; ++i) {
      const int64_t b = i / kv_heads, g = i % kv_heads;
      if (p.lens[b] <= 0) continue;
#ifdef TF_HAVE_AVX512BF16
      if (fast) {
        run_bf16(p, b, g, sc);
        continue;
      }
#endif
      if (dtype == 0)
        task_generic<uint16_t>(p, b, g, sc, acc, row);
      else
        task_generic<float>(p, b, g, sc, acc, row);
    }
  }
  (void)fast;
  return 0;
}

}  // extern "C"
