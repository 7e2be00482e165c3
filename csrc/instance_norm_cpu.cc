// lucid's native CPU kernels for instance norm, forward and backward, called
// from XLA through the typed FFI (jax.ffi.ffi_call).
//
// Instance norm is memory-bound: the floor is one read of the input and one
// write of the output. XLA's CPU backend reads the input twice forward (once
// for the statistics, once to normalize), because it will not keep one
// instance's data in cache between a reduction and the elementwise pass that
// consumes it. This kernel does exactly that: every
// instance (a row of the (N*C, M) view, or a channel block of an (N, M, C)
// slab) is read from memory once, then revisited from cache.
//
// Per instance, with k the first element (a shift close to the data) and the
// sums accumulated in double (see kBlock):
//     s1 = sum(x - k), s2 = sum((x - k)^2), mean = k + s1/M,
//     var = max(s2/M - (s1/M)^2, 0), r = 1/sqrt(var + eps),
//     y = ((x - mean_f) - e) * (r w) + b
// where mean_f is the mean rounded to float and e = mean - mean_f is the
// rounding residual, so the centring stays exact far from zero.
//
// Backward (the transpose of the tangent map in lucid/nn/_instance_norm.py),
// given the cotangents gy of y, gm of the mean and gv of the variance, with
// xhat = ((x - mean_f) - e) r:
//     g1 = sum(gy), g2 = sum(gy xhat)              (one read of x and gy)
//     gx = r w (gy - (g1 + xhat g2)/M) + (gm + 2 gv xhat / r)/M   (from cache)
// and the per-instance g1, g2 are returned: the weight and bias gradients
// are their sums over the batch, a small reduction left to XLA.
//
// Speed: the row loops use vectors of kWidth floats (16 with AVX-512), four
// independent accumulators per sum, short rows in groups (see RowGroup) whose
// sums reduce kWidth rows at a time (GroupSums), and
// on CPUs with AVX512-BF16 the hardware float -> bfloat16 conversion (round to
// nearest even like the portable path, but it flushes results below 2^-126,
// bfloat16 subnormals, to zero). Large outputs are written with non-temporal
// stores (kStreamBytes) and advised onto transparent huge pages
// (AdviseHugePages). Threads come from XLA's intra-op pool (ParallelFor).
//
// Layouts: attribute channels_last = 0 takes x as (P, N, C, M) flattened to
// rows of M contiguous elements; channels_last = 1 takes (P, N, M, C). P is a
// leading batch (from jax.vmap) over which weight and bias may differ: they
// have P*C elements. Statistics are (P, N, C).

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <type_traits>
#include <utility>
#include <thread>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// ---------------------------------------------------------------- dtypes --

inline float Bf16ToFloat(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

inline uint16_t FloatToBf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
  return static_cast<uint16_t>(u >> 16);
}

struct F32 {
  using Storage = float;
  static inline float Load(const float* p, int64_t i) { return p[i]; }
  static inline void Store(float* p, int64_t i, float v) { p[i] = v; }
};

struct BF16 {
  using Storage = uint16_t;
  static inline float Load(const uint16_t* p, int64_t i) { return Bf16ToFloat(p[i]); }
  static inline void Store(uint16_t* p, int64_t i, float v) { p[i] = FloatToBf16(v); }
};

// Sums run in float over blocks of this many elements (each SIMD lane adds a
// few dozen terms), and the block sums accumulate in double: float speed,
// near-double accuracy.
constexpr int64_t kBlock = 256;

// ------------------------------------------------------------------ simd --

// A vector of kWidth floats (GCC/Clang vector extensions): one AVX-512
// register where the build targets it, else one AVX (or two SSE) register.
#if defined(__AVX512F__)
constexpr int kWidth = 16;
#else
constexpr int kWidth = 8;
#endif
typedef float Vec __attribute__((vector_size(4 * kWidth)));
typedef uint32_t VecU32 __attribute__((vector_size(4 * kWidth)));
typedef int32_t VecI32 __attribute__((vector_size(4 * kWidth)));
typedef uint16_t VecU16 __attribute__((vector_size(2 * kWidth)));

inline Vec LoadVec(const float* p, int64_t i) {
  Vec v;
  std::memcpy(&v, p + i, sizeof(v));
  return v;
}

inline Vec LoadVec(const uint16_t* p, int64_t i) {
  VecU16 h;
  std::memcpy(&h, p + i, sizeof(h));
  const VecU32 u = __builtin_convertvector(h, VecU32) << 16;
  Vec v;
  std::memcpy(&v, &u, sizeof(v));
  return v;
}

// Round to nearest even, NaN kept quiet: FloatToBf16 on every lane.
inline VecU16 ToBf16(Vec v) {
#if defined(__AVX512BF16__) && defined(__AVX512F__)
  const __m256bh h = _mm512_cvtneps_pbh(reinterpret_cast<__m512>(v));
  VecU16 out;
  std::memcpy(&out, &h, sizeof(out));
  return out;
#else
  VecU32 u;
  std::memcpy(&u, &v, sizeof(u));
  const VecU32 rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const VecU32 nan = reinterpret_cast<VecU32>((u & 0x7fffffffu) > 0x7f800000u);
  return __builtin_convertvector((nan & ((u >> 16) | 0x40u)) | (~nan & rounded), VecU16);
#endif
}

inline void StoreVec(float* p, int64_t i, Vec v) { std::memcpy(p + i, &v, sizeof(v)); }
inline void StoreVec(uint16_t* p, int64_t i, Vec v) {
  const VecU16 h = ToBf16(v);
  std::memcpy(p + i, &h, sizeof(h));
}

// Non-temporal stores (around the caches, no read of the destination first)
// for outputs too large to stay in cache; p + i aligned to the stored size.
#if defined(__AVX512F__)
constexpr bool kCanStream = true;
inline void StreamVec(float* p, int64_t i, Vec v) { _mm512_stream_ps(p + i, reinterpret_cast<__m512>(v)); }
inline void StreamVec(uint16_t* p, int64_t i, Vec v) {
  _mm256_stream_si256(reinterpret_cast<__m256i*>(p + i), reinterpret_cast<__m256i>(ToBf16(v)));
}
inline void StreamFence() { _mm_sfence(); }
#else
constexpr bool kCanStream = false;
template <typename S>
inline void StreamVec(S* p, int64_t i, Vec v) { StoreVec(p, i, v); }
inline void StreamFence() {}
#endif

// Pairwise: log2(kWidth) dependent additions rather than kWidth.
inline float HorizontalSum(Vec v) {
  float lanes[kWidth];
  std::memcpy(lanes, &v, sizeof(v));
  for (int half = kWidth / 2; half > 0; half /= 2) {
    for (int l = 0; l < half; ++l) lanes[l] += lanes[l + half];
  }
  return lanes[0];
}

// out[i] = fn(a[i], b[i]) for i in [0, m); fn takes and returns floats or
// Vecs. With stream, the vector stores bypass the caches (see StreamVec), and
// a non-null `next` (the input the caller reads after this row, m elements
// or more) is prefetched alongside: its reads from memory then overlap these
// writes instead of following them (measured: the forward 10-15% faster on
// the large benchmark shapes; the backward, with two inputs, was not).
template <typename T, typename Fn>
inline void MapRow(typename T::Storage* out, const typename T::Storage* a, const typename T::Storage* b, int64_t m,
                   bool stream, Fn fn, const typename T::Storage* next = nullptr) {
  int64_t i = 0;
  if (stream && kCanStream) {
    constexpr uintptr_t kAlign = kWidth * sizeof(typename T::Storage);
    for (; i < m && reinterpret_cast<uintptr_t>(out + i) % kAlign != 0; ++i) {
      T::Store(out, i, fn(T::Load(a, i), T::Load(b, i)));
    }
    if (next != nullptr) {
      for (; i + kWidth <= m; i += kWidth) {
        __builtin_prefetch(next + i, 0, 3);
        StreamVec(out, i, fn(LoadVec(a, i), LoadVec(b, i)));
      }
    }
    for (; i + kWidth <= m; i += kWidth) StreamVec(out, i, fn(LoadVec(a, i), LoadVec(b, i)));
  }
  for (; i + kWidth <= m; i += kWidth) StoreVec(out, i, fn(LoadVec(a, i), LoadVec(b, i)));
  for (; i < m; ++i) T::Store(out, i, fn(T::Load(a, i), T::Load(b, i)));
}

// MapRow over a row in chunks of kChunk elements, last chunk first: the
// preceding pass over the row (its sums) read the end last, so with rows
// larger than the cache that end is still there (measured: forward and
// backward 10-20% faster on rows of 768 KB; no change on rows that fit).
template <typename T, typename Fn>
inline void MapRowFromEnd(typename T::Storage* out, const typename T::Storage* a, const typename T::Storage* b,
                          int64_t m, bool stream, Fn fn, const typename T::Storage* next = nullptr) {
  constexpr int64_t kChunk = 4096;
  for (int64_t hi = m; hi > 0;) {
    const int64_t lo = (hi - 1) / kChunk * kChunk;
    MapRow<T>(out + lo, a + lo, b + lo, hi - lo, stream, fn, next != nullptr ? next + lo : nullptr);
    hi = lo;
  }
}

// Row-layout outputs at least this large are written with non-temporal
// stores: they would not stay in cache for their consumer anyway (measured on
// the large benchmark shapes: forward 15-30% faster, backward about 10%).
constexpr int64_t kStreamBytes = int64_t{16} << 20;

// s1 = sum of u, s2 = sum of v over i in [0, m), where terms(a_i, b_i, u, v)
// gives the i-th pair from the i-th elements of a and b (as floats, or as a
// Vec for kWidth at once). Float sums in four independent vector accumulators
// per sum (to hide the latency of the additions) within each kBlock, double
// across blocks.
template <typename T, typename Terms>
inline void RowSums(const typename T::Storage* a, const typename T::Storage* b, int64_t m, Terms terms, double* s1,
                    double* s2) {
  constexpr int64_t kStep = 4 * kWidth;
  static_assert(kBlock % kStep == 0, "kBlock must be a multiple of kStep");
  double t1 = 0.0, t2 = 0.0;
  int64_t i0 = 0;
  for (; i0 + kBlock <= m; i0 += kBlock) {
    Vec a1[4] = {}, a2[4] = {};
    for (int64_t i = i0; i < i0 + kBlock; i += kStep) {
      for (int j = 0; j < 4; ++j) {
        Vec u, v;
        terms(LoadVec(a, i + kWidth * j), LoadVec(b, i + kWidth * j), u, v);
        a1[j] += u;
        a2[j] += v;
      }
    }
    t1 += HorizontalSum((a1[0] + a1[1]) + (a1[2] + a1[3]));
    t2 += HorizontalSum((a2[0] + a2[1]) + (a2[2] + a2[3]));
  }
  Vec a1 = {}, a2 = {};
  for (; i0 + kWidth <= m; i0 += kWidth) {
    Vec u, v;
    terms(LoadVec(a, i0), LoadVec(b, i0), u, v);
    a1 += u;
    a2 += v;
  }
  float b1 = HorizontalSum(a1), b2 = HorizontalSum(a2);
  for (; i0 < m; ++i0) {
    float u, v;
    terms(T::Load(a, i0), T::Load(b, i0), u, v);
    b1 += u;
    b2 += v;
  }
  *s1 = t1 + b1;
  *s2 = t2 + b2;
}

// Lane j of the result is the sum of the lanes of v[j]: kWidth horizontal
// sums at once, in log2(kWidth) rounds of two permutes and one addition per
// pair of vectors (each round halves the vectors and doubles the rows per
// vector; pairing j with j + H keeps the rows in order). The permute indices
// of round H, into the concatenation of a pair (a, b): in each block of 2H
// lanes, the low permute takes the first H lanes of a's block then of b's,
// the high one the last H lanes of each.
constexpr int PairIndex(int h, int lane, bool high) {
  const int base = lane / (2 * h) * (2 * h), off = lane % (2 * h);
  return (off < h ? base + off : kWidth + base + off - h) + (high ? h : 0);
}

template <int H, size_t... L>
inline Vec PairSum(Vec a, Vec b, std::index_sequence<L...>) {
#if defined(__clang__)
  return __builtin_shufflevector(a, b, PairIndex(H, L, false)...) +
         __builtin_shufflevector(a, b, PairIndex(H, L, true)...);
#else
  constexpr VecI32 lo = {PairIndex(H, L, false)...}, hi = {PairIndex(H, L, true)...};
  return __builtin_shuffle(a, b, lo) + __builtin_shuffle(a, b, hi);
#endif
}

template <int H>
inline void PairRound(Vec* v) {
  for (int j = 0; j < H; ++j) v[j] = PairSum<H>(v[j], v[j + H], std::make_index_sequence<kWidth>{});
  if constexpr (H > 1) PairRound<H / 2>(v);
}

inline Vec TransposeSum(Vec* v) {
  PairRound<kWidth / 2>(v);
  return v[0];
}

// {0, 1, ..., kWidth - 1}.
struct LaneIndices {
  int32_t lane[kWidth];
};
constexpr LaneIndices MakeLaneIndices() {
  LaneIndices p{};
  for (int l = 0; l < kWidth; ++l) p.lane[l] = l;
  return p;
}

inline VecI32 Iota() {
  static constexpr LaneIndices kIota = MakeLaneIndices();
  VecI32 v;
  std::memcpy(&v, kIota.lane, sizeof(v));
  return v;
}

// The per-lane partial sums (u, v) of terms over one row of m <= kBlock
// elements; a partial last vector is padded and its extra lanes dropped.
template <typename T, typename Terms>
inline void RowPartials(const typename T::Storage* a, const typename T::Storage* b, int64_t m, Terms terms, Vec* u,
                        Vec* v) {
  Vec u0 = {}, v0 = {}, u1 = {}, v1 = {};
  int64_t i = 0;
  for (; i + 2 * kWidth <= m; i += 2 * kWidth) {
    Vec p, q;
    terms(LoadVec(a, i), LoadVec(b, i), p, q);
    u0 += p;
    v0 += q;
    terms(LoadVec(a, i + kWidth), LoadVec(b, i + kWidth), p, q);
    u1 += p;
    v1 += q;
  }
  if (i + kWidth <= m) {
    Vec p, q;
    terms(LoadVec(a, i), LoadVec(b, i), p, q);
    u0 += p;
    v0 += q;
    i += kWidth;
  }
  if (i < m) {
    typename T::Storage ta[kWidth] = {}, tb[kWidth] = {};
    std::memcpy(ta, a + i, (m - i) * sizeof(ta[0]));
    std::memcpy(tb, b + i, (m - i) * sizeof(tb[0]));
    const VecU32 keep = reinterpret_cast<VecU32>(Iota() < static_cast<int32_t>(m - i));
    Vec p, q;
    terms(LoadVec(ta, 0), LoadVec(tb, 0), p, q);
    u1 += reinterpret_cast<Vec>(reinterpret_cast<VecU32>(p) & keep);
    v1 += reinterpret_cast<Vec>(reinterpret_cast<VecU32>(q) & keep);
  }
  *u = u0 + u1;
  *v = v0 + v1;
}

// RowSums for `rows` consecutive rows of m elements (a group, see RowGroup):
// terms(j, a_i, b_i, u, v) gives the pair of row j. Rows longer than kBlock go
// one by one; shorter ones (wholly float, as in RowSums) reduce kWidth rows
// at a time with TransposeSum, where one horizontal sum per row would cost as
// much as the row itself.
template <typename T, typename Terms>
inline void GroupSums(const typename T::Storage* a, const typename T::Storage* b, int64_t m, int64_t rows,
                      Terms terms, double* s1, double* s2) {
  if (m > kBlock) {
    for (int64_t j = 0; j < rows; ++j) {
      RowSums<T>(
          a + j * m, b + j * m, m, [&terms, j](auto x, auto y, auto& u, auto& v) { terms(j, x, y, u, v); }, &s1[j],
          &s2[j]);
    }
    return;
  }
  for (int64_t j0 = 0; j0 < rows; j0 += kWidth) {
    Vec u[kWidth], v[kWidth];
    const int64_t count = std::min<int64_t>(kWidth, rows - j0);
    for (int64_t j = count; j < kWidth; ++j) u[j] = v[j] = Vec{};
    for (int64_t j = 0; j < count; ++j) {
      RowPartials<T>(
          a + (j0 + j) * m, b + (j0 + j) * m, m,
          [&terms, j0, j](auto x, auto y, auto& p, auto& q) { terms(j0 + j, x, y, p, q); }, &u[j], &v[j]);
    }
    float f1[kWidth], f2[kWidth];
    const Vec t1 = TransposeSum(u), t2 = TransposeSum(v);
    std::memcpy(f1, &t1, sizeof(f1));
    std::memcpy(f2, &t2, sizeof(f2));
    for (int64_t j = 0; j < count; ++j) {
      s1[j0 + j] = f1[j];
      s2[j0 + j] = f2[j];
    }
  }
}

// Channels-last work goes over a slab of rows of C channels (stride c) in
// blocks of kBlock rows and, within a block, in channel groups of up to
// kSlabVecs vectors, whose sums (or coefficients) stay in registers down the
// block's rows. group(nv, j0) is called for groups of nv =
// std::integral_constant<int, NV> vectors starting at channel j0, covering the
// whole vectors of [0, width); the return value is the first channel past
// them (the rest, under kWidth channels, is left to the caller).
constexpr int kSlabVecs = 4;

template <typename Group>
inline int64_t ForEachChannelGroup(int64_t width, Group&& group) {
  int64_t j0 = 0;
  for (; j0 + kSlabVecs * kWidth <= width; j0 += kSlabVecs * kWidth) {
    group(std::integral_constant<int, kSlabVecs>{}, j0);
  }
  switch ((width - j0) / kWidth) {
    case 3:
      group(std::integral_constant<int, 3>{}, j0);
      return j0 + 3 * kWidth;
    case 2:
      group(std::integral_constant<int, 2>{}, j0);
      return j0 + 2 * kWidth;
    case 1:
      group(std::integral_constant<int, 1>{}, j0);
      return j0 + kWidth;
    default:
      return j0;
  }
}

// p[j, j + kWidth) as a Vec, or p[j] as a float: per-channel constants in the
// shape of the data they meet.
template <typename V>
inline V Lanes(const float* p, int64_t j) {
  if constexpr (std::is_same_v<V, Vec>) {
    return LoadVec(p, j);
  } else {
    return p[j];
  }
}

// The channels-last counterpart of RowSums: per channel j in [0, width), the
// sums of terms(j, a_ij, b_ij, u, v) over the m rows (stride c) of a and b
// (j the first channel of a Vec of channels, or of one float), in float over
// kBlock rows at a time and in double across them.
template <typename T, typename Terms>
void SlabSums(const typename T::Storage* a, const typename T::Storage* b, int64_t m, int64_t c, int64_t width,
              Terms terms, double* s1, double* s2) {
  std::vector<float> f1(width), f2(width);
  std::fill(s1, s1 + width, 0.0);
  std::fill(s2, s2 + width, 0.0);
  for (int64_t i0 = 0; i0 < m; i0 += kBlock) {
    const int64_t i1 = std::min(m, i0 + kBlock);
    const int64_t tail = ForEachChannelGroup(width, [&](auto nv, int64_t j0) {
      constexpr int NV = decltype(nv)::value;
      Vec u[NV] = {}, v[NV] = {};
      for (int64_t i = i0; i < i1; ++i) {
        const typename T::Storage* ar = a + i * c + j0;
        const typename T::Storage* br = b + i * c + j0;
        for (int q = 0; q < NV; ++q) {
          Vec p, r;
          terms(j0 + q * kWidth, LoadVec(ar, q * kWidth), LoadVec(br, q * kWidth), p, r);
          u[q] += p;
          v[q] += r;
        }
      }
      for (int q = 0; q < NV; ++q) {
        StoreVec(f1.data(), j0 + q * kWidth, u[q]);
        StoreVec(f2.data(), j0 + q * kWidth, v[q]);
      }
    });
    std::fill(f1.begin() + tail, f1.end(), 0.0f);
    std::fill(f2.begin() + tail, f2.end(), 0.0f);
    for (int64_t i = i0; i < i1; ++i) {
      for (int64_t j = tail; j < width; ++j) {
        float u, v;
        terms(j, T::Load(a + i * c, j), T::Load(b + i * c, j), u, v);
        f1[j] += u;
        f2[j] += v;
      }
    }
    for (int64_t j = 0; j < width; ++j) {
      s1[j] += f1[j];
      s2[j] += f2[j];
    }
  }
}

// The channels-last counterpart of MapRow: out_ij = fn(a_ij, b_ij, k) over m
// rows (stride c) and channels [0, width), where k points to the channel's
// (or Vec of channels') four constants, one from each of coef[0..3]. With
// stream, vector stores bypass the caches (rows and out aligned to them).
template <typename T, typename Fn>
void SlabMap(typename T::Storage* out, const typename T::Storage* a, const typename T::Storage* b, int64_t m,
             int64_t c, int64_t width, const float* const (&coef)[4], bool stream, Fn fn) {
  for (int64_t i0 = 0; i0 < m; i0 += kBlock) {
    const int64_t i1 = std::min(m, i0 + kBlock);
    const int64_t tail = ForEachChannelGroup(width, [&](auto nv, int64_t j0) {
      constexpr int NV = decltype(nv)::value;
      Vec k[NV][4];
      for (int q = 0; q < NV; ++q) {
        for (int t = 0; t < 4; ++t) k[q][t] = LoadVec(coef[t], j0 + q * kWidth);
      }
      for (int64_t i = i0; i < i1; ++i) {
        const typename T::Storage* ar = a + i * c + j0;
        const typename T::Storage* br = b + i * c + j0;
        typename T::Storage* outr = out + i * c + j0;
        for (int q = 0; q < NV; ++q) {
          const Vec r = fn(LoadVec(ar, q * kWidth), LoadVec(br, q * kWidth), k[q]);
          if (stream) {
            StreamVec(outr, q * kWidth, r);
          } else {
            StoreVec(outr, q * kWidth, r);
          }
        }
      }
    });
    for (int64_t j = tail; j < width; ++j) {
      const float k[4] = {coef[0][j], coef[1][j], coef[2][j], coef[3][j]};
      for (int64_t i = i0; i < i1; ++i) T::Store(out + i * c, j, fn(T::Load(a + i * c, j), T::Load(b + i * c, j), k));
    }
  }
  if (stream) StreamFence();
}

// Whether SlabMap may stream into out (channel block start) with row stride c.
template <typename S>
inline bool CanStreamSlab(const S* out, int64_t c, int64_t out_bytes) {
  return kCanStream && out_bytes >= kStreamBytes && c % kWidth == 0 &&
         reinterpret_cast<uintptr_t>(out) % (kWidth * sizeof(S)) == 0;
}

// ---------------------------------------------------------------- memory --

// Output buffers come fresh from XLA's allocator, and on Linux a large one is
// often new address space whose first write faults in (and the kernel zeroes)
// one 4 KiB page at a time: for a 32 MiB output that costs more than the
// kernel's own work. Asking for transparent huge pages on the 2 MiB-aligned
// interior of the buffer makes those faults 512 times fewer. Advice only: a
// no-op where huge pages are off or the pages are already there.
void AdviseHugePages(void* data, int64_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{1} << 21;
  if (bytes < static_cast<int64_t>(4 * kHuge)) return;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(data) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(data) + static_cast<uintptr_t>(bytes)) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)data;
  (void)bytes;
#endif
}

// ------------------------------------------------------------- threading --

// Helper threads for ParallelFor: `schedule` runs a task on another thread
// (in the FFI handlers, XLA's intra-op pool, so lucid starts no threads of its
// own and shares the cores with the rest of the program), `helpers` says how
// many may run at once.
struct Workers {
  int64_t helpers = 0;
  std::function<void(std::function<void()>)> schedule;
};

// Runs body(begin, end) over [0, units) in contiguous chunks, claimed from a
// shared counter by the calling thread and by up to `helpers` tasks. The
// caller claims chunks too, so the work completes even when no task ever
// starts (a busy pool, or one that runs tasks inline; without a pool,
// helpers is 0 and the work runs on the calling thread alone), and it
// returns once every claimed chunk is done: a task that starts later finds
// no chunk left and touches only the counters, which it co-owns. Small
// problems stay on the calling thread.
template <typename Body>
void ParallelFor(const Workers& workers, int64_t units, int64_t bytes, Body body) {
  static const int64_t kCores = std::max<int64_t>(1, std::thread::hardware_concurrency());
  constexpr int64_t kMinBytesPerChunk = int64_t{1} << 18;
  const int64_t threads = std::min<int64_t>({kCores, 1 + workers.helpers, units});
  // One chunk per thread (measured: finer chunks slowed the backward).
  const int64_t chunks = std::min<int64_t>(threads, bytes / kMinBytesPerChunk);
  if (threads <= 1 || chunks <= 1 || !workers.schedule) {
    body(int64_t{0}, units);
    return;
  }
  struct Counters {
    std::atomic<int64_t> next{0}, active{0};
  };
  auto counters = std::make_shared<Counters>();
  const int64_t chunk = (units + chunks - 1) / chunks;
  auto drain = [counters, units, chunk, b = &body] {
    counters->active.fetch_add(1);
    for (int64_t u; (u = counters->next.fetch_add(chunk)) < units;) (*b)(u, std::min(u + chunk, units));
    counters->active.fetch_sub(1);
  };
  for (int64_t t = 1; t < chunks; ++t) workers.schedule(drain);
  drain();
  // Sequentially consistent counters (the defaults) are what make this exact:
  // a task's increment of `active` precedes its successful claim, which
  // precedes the caller's final failed claim and so this load.
  while (counters->active.load() != 0) std::this_thread::yield();
}

struct Shape {
  int64_t p = 1;  // leading (vmap) batch: weight and bias differ along it
  int64_t n = 1;
  int64_t c = 1;
  int64_t m = 1;  // spatial size of one instance
};

ffi::Error ReadShape(ffi::AnyBuffer::Dimensions dims, int64_t channels_last, int64_t param_size, Shape* s) {
  if (dims.size() < 3) return ffi::Error::InvalidArgument("lucid kernel: x must have at least 3 dims");
  int64_t r = dims.size();
  s->n = dims[r - 3];
  s->c = channels_last ? dims[r - 1] : dims[r - 2];
  s->m = channels_last ? dims[r - 2] : dims[r - 1];
  s->p = 1;
  for (int64_t i = 0; i + 3 < r; ++i) s->p *= dims[i];
  if (s->c <= 0 || param_size != s->p * s->c) {
    return ffi::Error::InvalidArgument("lucid kernel: weight/bias size must be P*C");
  }
  return ffi::Error::Success();
}

// Channels-first work goes row by row, a few short rows at a time: the sums
// of a group first, then the per-row coefficients (square roots and
// divisions of different rows overlap instead of each row waiting on its
// own), then the outputs, while the group is still in cache.
constexpr int64_t kGroup = 16;
constexpr int64_t kGroupBytes = int64_t{1} << 16;

inline int64_t RowGroup(int64_t row_bytes) {
  return std::clamp<int64_t>(kGroupBytes / std::max<int64_t>(row_bytes, 1), 1, kGroup);
}

// The indices into weight (P*C) of rows [r0, r0 + rows) of the (P*N*C, M)
// view (two divisions per group rather than per row).
inline void ParamIndices(const Shape& s, int64_t r0, int64_t rows, int64_t* pc) {
  int64_t c = r0 % s.c, q = r0 / s.c, n = q % s.n, p = q / s.n;
  for (int64_t j = 0; j < rows; ++j) {
    pc[j] = p * s.c + c;
    if (++c == s.c) {
      c = 0;
      if (++n == s.n) {
        n = 0;
        ++p;
      }
    }
  }
}

// --------------------------------------------------------------- forward --

// One instance's statistics from its shifted sums s1 = sum(x - k) and
// s2 = sum((x - k)^2) over m = 1 / inv_m elements: the mean as a float and
// its rounding residual, the biased variance and 1 / sqrt(var + eps).
// Branch-free (the clamp is a select), so loops over instances vectorize.
struct Moments {
  float mean, residual, var, rstd;
};

inline Moments MomentsOf(double s1, double s2, float k, double inv_m, float eps) {
  const double md = s1 * inv_m;
  const double d = s2 * inv_m - md * md, v = d > 0.0 ? d : 0.0;
  const double mu = k + md;
  const float mean = static_cast<float>(mu);
  return {mean, static_cast<float>(mu - static_cast<double>(mean)), static_cast<float>(v),
          static_cast<float>(1.0 / std::sqrt(v + eps))};
}

// Rows of M contiguous elements (channels-first), [begin, end) of the
// (P*N*C, M) view, in groups (see RowGroup).
template <typename T>
void ForwardRows(const Shape& s, int64_t begin, int64_t end, bool stream, float eps, const typename T::Storage* x,
                 const float* w, const float* b, typename T::Storage* y, float* mean, float* residual, float* var) {
  const int64_t m = s.m, group = RowGroup(m * sizeof(typename T::Storage));
  const double inv_m = 1.0 / m;
  double s1[kGroup] = {}, s2[kGroup] = {};
  float k[kGroup] = {}, mean_f[kGroup], e[kGroup], var_f[kGroup], r[kGroup];
  int64_t pc[kGroup];
  for (int64_t r0 = begin; r0 < end; r0 += group) {
    const int64_t rows = std::min(group, end - r0);
    const typename T::Storage* xg = x + r0 * m;
    for (int64_t j = 0; j < rows; ++j) k[j] = T::Load(xg + j * m, 0);
    GroupSums<T>(
        xg, xg, m, rows,
        [&k](int64_t j, auto xi, auto, auto& u, auto& v) {
          const auto d = xi - k[j];
          u = d;
          v = d * d;
        },
        s1, s2);
    // Every slot, a fixed trip count that vectorizes; slots past `rows` are unused.
#pragma omp simd
    for (int64_t j = 0; j < kGroup; ++j) {
      const Moments mo = MomentsOf(s1[j], s2[j], k[j], inv_m, eps);
      mean_f[j] = mo.mean;
      e[j] = mo.residual;
      var_f[j] = mo.var;
      r[j] = mo.rstd;
    }
    ParamIndices(s, r0, rows, pc);
    std::copy(mean_f, mean_f + rows, mean + r0);
    std::copy(e, e + rows, residual + r0);
    std::copy(var_f, var_f + rows, var + r0);
    for (int64_t j = 0; j < rows; ++j) {
      const float mf = mean_f[j], ej = e[j], aj = r[j] * w[pc[j]], bj = b[pc[j]];
      // Row j of the next group, if this thread has one.
      const typename T::Storage* next = r0 + rows + j < end ? xg + (rows + j) * m : nullptr;
      MapRowFromEnd<T>(y + (r0 + j) * m, xg + j * m, xg + j * m, m, stream,
                       [=](auto xi, auto) { return ((xi - mf) - ej) * aj + bj; }, next);
    }
  }
  if (stream) StreamFence();
}

// One (n) slab of M rows of C contiguous channels (channels-last), channels [c0, c1).
template <typename T>
void ForwardSlab(const typename T::Storage* x, typename T::Storage* y, int64_t m, int64_t c, int64_t c0,
                 int64_t c1, bool stream, float eps, const float* w, const float* b, float* mean_out,
                 float* residual_out, float* var_out) {
  const int64_t width = c1 - c0;
  std::vector<double> s1(width), s2(width);
  std::vector<float> k(width), mean_f(width), e(width), a(width), bb(width);
  for (int64_t j = 0; j < width; ++j) k[j] = T::Load(x, c0 + j);
  SlabSums<T>(
      x + c0, x + c0, m, c, width,
      [k = k.data()](int64_t j, auto xj, auto, auto& u, auto& v) {
        const auto d = xj - Lanes<decltype(xj)>(k, j);
        u = d;
        v = d * d;
      },
      s1.data(), s2.data());
  const double inv_m = 1.0 / m;
  for (int64_t j = 0; j < width; ++j) {
    const Moments mo = MomentsOf(s1[j], s2[j], k[j], inv_m, eps);
    mean_f[j] = mo.mean;
    e[j] = mo.residual;
    a[j] = mo.rstd * w[c0 + j];
    bb[j] = b[c0 + j];
    mean_out[c0 + j] = mo.mean;
    residual_out[c0 + j] = mo.residual;
    var_out[c0 + j] = mo.var;
  }
  const float* const coef[4] = {mean_f.data(), e.data(), a.data(), bb.data()};
  SlabMap<T>(y + c0, x + c0, x + c0, m, c, width, coef, stream,
             [](auto xi, auto, const auto* k) { return ((xi - k[0]) - k[1]) * k[2] + k[3]; });
}

// Channel blocks per slab for channels-last work: enough units to keep every
// thread busy, each block a whole number of cache lines wide where possible.
// (Narrower blocks that would keep a block in cache between the two passes
// measured slower: strided reads over a slab cost more than re-reading it.)
int64_t ChannelBlocks(const Shape& s) {
  static const int64_t kThreads = std::max<int64_t>(1, std::thread::hardware_concurrency());
  const int64_t slabs = s.p * s.n;
  int64_t blocks = (2 * kThreads + slabs - 1) / slabs;
  return std::max<int64_t>(1, std::min<int64_t>(blocks, s.c / 16));
}

// The first channel of block blk of `blocks` over c channels: a multiple of
// kWidth (whole vectors, aligned stores) except at the end. ChannelBlocks
// leaves every block at least 16 channels wide, so none ends up empty.
inline int64_t BlockStart(int64_t c, int64_t blk, int64_t blocks) {
  return blk == blocks ? c : c * blk / blocks / kWidth * kWidth;
}

// Runs body(slab, p, c0, c1) for channels [c0, c1) of every (N) slab, p its
// leading (vmap) index, the blocks split across threads.
template <typename Body>
void ForEachChannelBlock(const Workers& workers, const Shape& s, int64_t bytes, Body body) {
  const int64_t blocks = ChannelBlocks(s);
  ParallelFor(workers, s.p * s.n * blocks, bytes, [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) {
      const int64_t slab = u / blocks, blk = u % blocks;
      body(slab, slab / s.n, BlockStart(s.c, blk, blocks), BlockStart(s.c, blk + 1, blocks));
    }
  });
}

template <typename T>
void Forward(const Workers& workers, const Shape& s, int64_t channels_last, float eps, const void* xv, const float* w,
             const float* b, void* yv, float* mean, float* residual, float* var) {
  auto* x = static_cast<const typename T::Storage*>(xv);
  auto* y = static_cast<typename T::Storage*>(yv);
  const int64_t instances = s.p * s.n * s.c;
  const int64_t bytes = instances * s.m * static_cast<int64_t>(sizeof(typename T::Storage));
  AdviseHugePages(y, bytes);
  if (!channels_last) {
    ParallelFor(workers, instances, bytes, [&](int64_t begin, int64_t end) {
      ForwardRows<T>(s, begin, end, bytes >= kStreamBytes, eps, x, w, b, y, mean, residual, var);
    });
    return;
  }
  ForEachChannelBlock(workers, s, bytes, [&](int64_t slab, int64_t p, int64_t c0, int64_t c1) {
    typename T::Storage* out = y + slab * s.m * s.c;
    ForwardSlab<T>(x + slab * s.m * s.c, out, s.m, s.c, c0, c1, CanStreamSlab(out + c0, s.c, bytes), eps,
                   w + p * s.c, b + p * s.c, mean + slab * s.c, residual + slab * s.c, var + slab * s.c);
  });
}

// Workers on XLA's intra-op thread pool; the handler's own thread is one of
// the pool's threads or waits on them, so at most num_threads - 1 helpers.
Workers PoolWorkers(ffi::ThreadPool& pool) {
  return {std::max<int64_t>(0, pool.num_threads() - 1),
          [&pool](std::function<void()> task) { pool.Schedule(std::move(task)); }};
}

ffi::Error ForwardImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::Buffer<ffi::F32> w, ffi::Buffer<ffi::F32> b,
                       ffi::Result<ffi::AnyBuffer> y, ffi::ResultBuffer<ffi::F32> mean,
                       ffi::ResultBuffer<ffi::F32> residual, ffi::ResultBuffer<ffi::F32> var, float eps,
                       int64_t channels_last) {
  Shape s;
  if (auto err = ReadShape(x.dimensions(), channels_last, w.element_count(), &s); err.failure()) return err;
  const Workers workers = PoolWorkers(pool);
  if (b.element_count() != w.element_count()) return ffi::Error::InvalidArgument("lucid kernel: bias size");
  if (s.m <= 0) return ffi::Error::Success();
  switch (x.element_type()) {
    case ffi::F32:
      Forward<F32>(workers, s, channels_last, eps, x.untyped_data(), w.typed_data(), b.typed_data(), y->untyped_data(),
                   mean->typed_data(), residual->typed_data(), var->typed_data());
      return ffi::Error::Success();
    case ffi::BF16:
      Forward<BF16>(workers, s, channels_last, eps, x.untyped_data(), w.typed_data(), b.typed_data(), y->untyped_data(),
                    mean->typed_data(), residual->typed_data(), var->typed_data());
      return ffi::Error::Success();
    default:
      return ffi::Error::InvalidArgument("lucid kernel: x must be float32 or bfloat16");
  }
}


// -------------------------------------------------------------- backward --

// The per-instance coefficients of gx = gy * a + (x - mean_f) * q + z.
struct BackwardCoefficients {
  float a, q, z;
};

inline BackwardCoefficients Coefficients(double g1, double g2, int64_t m, float e, float r, float w, float gm,
                                         float gv) {
  const double a = static_cast<double>(r) * w;
  // gx = a gy + xhat * bx + cx with xhat = (x - mean_f - e) r
  const double bx = (2.0 * gv / r - a * g2) / m;
  const double cx = (gm - a * g1) / m;
  const double q = bx * r;
  return {static_cast<float>(a), static_cast<float>(q), static_cast<float>(cx - e * q)};
}

struct BackwardArgs {
  const void* x;
  const void* gy;
  const float* mean;
  const float* residual;
  const float* rstd;
  const float* w;
  const float* gmean;
  const float* gvar;
  void* gx;
  float* g1;
  float* g2;
};

template <typename T>
void BackwardRows(const Shape& s, int64_t begin, int64_t end, bool stream, const BackwardArgs& args) {
  auto* x = static_cast<const typename T::Storage*>(args.x);
  auto* gy = static_cast<const typename T::Storage*>(args.gy);
  auto* gx = static_cast<typename T::Storage*>(args.gx);
  const int64_t m = s.m, group = RowGroup(2 * m * sizeof(typename T::Storage));
  // Per-row operands and coefficients of a group; slots past `rows` hold
  // harmless values (1 for rstd) so the coefficient loop can run all kGroup.
  double g1[kGroup] = {}, g2[kGroup] = {};
  float mf[kGroup] = {}, ef[kGroup] = {}, rs[kGroup], wr[kGroup] = {}, gm[kGroup] = {}, gv[kGroup] = {};
  float ka[kGroup], kq[kGroup], kz[kGroup];
  std::fill(rs, rs + kGroup, 1.0f);
  int64_t pc[kGroup];
  for (int64_t r0 = begin; r0 < end; r0 += group) {
    const int64_t rows = std::min(group, end - r0);
    std::copy(args.mean + r0, args.mean + r0 + rows, mf);
    std::copy(args.residual + r0, args.residual + r0 + rows, ef);
    std::copy(args.rstd + r0, args.rstd + r0 + rows, rs);
    std::copy(args.gmean + r0, args.gmean + r0 + rows, gm);
    std::copy(args.gvar + r0, args.gvar + r0 + rows, gv);
    ParamIndices(s, r0, rows, pc);
    for (int64_t j = 0; j < rows; ++j) wr[j] = args.w[pc[j]];
    GroupSums<T>(
        gy + r0 * m, x + r0 * m, m, rows,
        [&mf, &ef](int64_t j, auto g, auto xi, auto& u, auto& v) {
          u = g;
          v = g * ((xi - mf[j]) - ef[j]);
        },
        g1, g2);
    // A fixed trip count that vectorizes, as in ForwardRows.
#pragma omp simd
    for (int64_t j = 0; j < kGroup; ++j) {
      g2[j] *= rs[j];
      const BackwardCoefficients k = Coefficients(g1[j], g2[j], m, ef[j], rs[j], wr[j], gm[j], gv[j]);
      ka[j] = k.a;
      kq[j] = k.q;
      kz[j] = k.z;
    }
    for (int64_t j = 0; j < rows; ++j) {
      args.g1[r0 + j] = static_cast<float>(g1[j]);
      args.g2[r0 + j] = static_cast<float>(g2[j]);
    }
    for (int64_t j = 0; j < rows; ++j) {
      const int64_t r = r0 + j;
      const float mfj = mf[j], aj = ka[j], qj = kq[j], zj = kz[j];
      MapRowFromEnd<T>(gx + r * m, gy + r * m, x + r * m, m, stream,
                       [=](auto g, auto xi) { return g * aj + (xi - mfj) * qj + zj; });
    }
  }
  if (stream) StreamFence();
}

template <typename T>
void BackwardSlab(const typename T::Storage* x, const typename T::Storage* gy, typename T::Storage* gx, int64_t m,
                  int64_t c, int64_t c0, int64_t c1, bool stream, const float* mean_f, const float* e,
                  const float* r, const float* w, const float* gm, const float* gv, float* g1_out, float* g2_out) {
  const int64_t width = c1 - c0;
  std::vector<double> s1(width), s2(width);
  std::vector<float> a(width), q(width), z(width), mf(mean_f + c0, mean_f + c1), ef(e + c0, e + c1);
  SlabSums<T>(
      gy + c0, x + c0, m, c, width,
      [mf = mf.data(), ef = ef.data()](int64_t j, auto g, auto xj, auto& u, auto& v) {
        using V = decltype(g);
        u = g;
        v = g * ((xj - Lanes<V>(mf, j)) - Lanes<V>(ef, j));
      },
      s1.data(), s2.data());
  for (int64_t j = 0; j < width; ++j) {
    const double g2 = s2[j] * r[c0 + j];
    const BackwardCoefficients k = Coefficients(s1[j], g2, m, ef[j], r[c0 + j], w[c0 + j], gm[c0 + j], gv[c0 + j]);
    a[j] = k.a;
    q[j] = k.q;
    z[j] = k.z;
    g1_out[c0 + j] = static_cast<float>(s1[j]);
    g2_out[c0 + j] = static_cast<float>(g2);
  }
  const float* const coef[4] = {a.data(), mf.data(), q.data(), z.data()};
  SlabMap<T>(gx + c0, gy + c0, x + c0, m, c, width, coef, stream,
             [](auto g, auto xi, const auto* k) { return g * k[0] + (xi - k[1]) * k[2] + k[3]; });
}

template <typename T>
void Backward(const Workers& workers, const Shape& s, int64_t channels_last, const BackwardArgs& args) {
  auto* x = static_cast<const typename T::Storage*>(args.x);
  auto* gy = static_cast<const typename T::Storage*>(args.gy);
  auto* gx = static_cast<typename T::Storage*>(args.gx);
  const int64_t instances = s.p * s.n * s.c;
  const int64_t out_bytes = instances * s.m * static_cast<int64_t>(sizeof(typename T::Storage));
  const int64_t bytes = 3 * out_bytes;
  AdviseHugePages(gx, out_bytes);
  if (!channels_last) {
    ParallelFor(workers, instances, bytes, [&](int64_t begin, int64_t end) {
      BackwardRows<T>(s, begin, end, out_bytes >= kStreamBytes, args);
    });
    return;
  }
  ForEachChannelBlock(workers, s, bytes, [&](int64_t slab, int64_t p, int64_t c0, int64_t c1) {
    const int64_t off = slab * s.m * s.c, st = slab * s.c;
    BackwardSlab<T>(x + off, gy + off, gx + off, s.m, s.c, c0, c1, CanStreamSlab(gx + off + c0, s.c, out_bytes),
                    args.mean + st, args.residual + st,
                    args.rstd + st, args.w + p * s.c, args.gmean + st, args.gvar + st, args.g1 + st, args.g2 + st);
  });
}

ffi::Error BackwardImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer gy, ffi::Buffer<ffi::F32> mean,
                        ffi::Buffer<ffi::F32> residual, ffi::Buffer<ffi::F32> rstd, ffi::Buffer<ffi::F32> w,
                        ffi::Buffer<ffi::F32> gmean, ffi::Buffer<ffi::F32> gvar, ffi::Result<ffi::AnyBuffer> gx,
                        ffi::ResultBuffer<ffi::F32> g1, ffi::ResultBuffer<ffi::F32> g2, int64_t channels_last) {
  Shape s;
  if (auto err = ReadShape(x.dimensions(), channels_last, w.element_count(), &s); err.failure()) return err;
  const Workers workers = PoolWorkers(pool);
  const int64_t instances = s.p * s.n * s.c;
  for (size_t size : {mean.element_count(), residual.element_count(), rstd.element_count(),
                      gmean.element_count(), gvar.element_count()}) {
    if (static_cast<int64_t>(size) != instances) {
      return ffi::Error::InvalidArgument("lucid kernel: statistics must have P*N*C elements");
    }
  }
  if (gy.element_type() != x.element_type() || gy.element_count() != x.element_count()) {
    return ffi::Error::InvalidArgument("lucid kernel: gy must match x");
  }
  if (s.m <= 0) return ffi::Error::Success();
  const BackwardArgs args{x.untyped_data(),     gy.untyped_data(),    mean.typed_data(),
                          residual.typed_data(), rstd.typed_data(),    w.typed_data(),
                          gmean.typed_data(),    gvar.typed_data(),    gx->untyped_data(),
                          g1->typed_data(),      g2->typed_data()};
  switch (x.element_type()) {
    case ffi::F32:
      Backward<F32>(workers, s, channels_last, args);
      return ffi::Error::Success();
    case ffi::BF16:
      Backward<BF16>(workers, s, channels_last, args);
      return ffi::Error::Success();
    default:
      return ffi::Error::InvalidArgument("lucid kernel: x must be float32 or bfloat16");
  }
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LucidInstanceNormForward, ForwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("eps")
                                  .Attr<int64_t>("channels_last"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(LucidInstanceNormBackward, BackwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("channels_last"));
