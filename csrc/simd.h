// The element types lucid's kernels read and write (float32, bfloat16), and
// the vectors of kWidth floats they compute in: loads, stores, streaming
// stores, bfloat16 conversion, horizontal and transpose sums.
//
// Everything ISA-specific sits behind the compiler's target macros
// (__AVX2__, __AVX512F__, __AVX512BF16__): the same source builds for any
// target. setup.py compiles it once per instruction-set path (baseline
// x86-64, AVX2, AVX-512, AVX-512 with BF16; generic elsewhere, NEON on
// aarch64) into libraries of their own, and lucid loads the one the CPU runs.

#ifndef LUCID_CSRC_SIMD_H_
#define LUCID_CSRC_SIMD_H_

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace lucid {

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

// Element-type tags: how one element of x (and of the outputs shaped like it)
// is stored, and read or written as a float. The kernels compute in float.
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

// ------------------------------------------------------------------ simd --

// A vector of kWidth floats (GCC/Clang vector extensions): one AVX-512
// register where the build targets it, else one AVX register (or two SSE or
// NEON registers).
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

// Round to nearest even, NaN kept quiet: FloatToBf16 on every lane. On CPUs
// with AVX512-BF16 the hardware conversion does it (rounding like the
// portable path, but it flushes results below 2^-126, bfloat16 subnormals,
// to zero).
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
// Where the target has none, plain stores (and kCanStream tells callers).
#if defined(__AVX512F__) || defined(__AVX2__)
constexpr bool kCanStream = true;
#if defined(__AVX512F__)
inline void StreamVec(float* p, int64_t i, Vec v) { _mm512_stream_ps(p + i, reinterpret_cast<__m512>(v)); }
inline void StreamVec(uint16_t* p, int64_t i, Vec v) {
  _mm256_stream_si256(reinterpret_cast<__m256i*>(p + i), reinterpret_cast<__m256i>(ToBf16(v)));
}
#else
inline void StreamVec(float* p, int64_t i, Vec v) { _mm256_stream_ps(p + i, reinterpret_cast<__m256>(v)); }
inline void StreamVec(uint16_t* p, int64_t i, Vec v) {
  _mm_stream_si128(reinterpret_cast<__m128i*>(p + i), reinterpret_cast<__m128i>(ToBf16(v)));
}
#endif
inline void StreamFence() { _mm_sfence(); }
#else
constexpr bool kCanStream = false;
template <typename S>
inline void StreamVec(S* p, int64_t i, Vec v) { StoreVec(p, i, v); }
inline void StreamFence() {}
#endif

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

// ------------------------------------------------------------------ sums --

// Pairwise: log2(kWidth) dependent additions rather than kWidth.
inline float HorizontalSum(Vec v) {
  float lanes[kWidth];
  std::memcpy(lanes, &v, sizeof(v));
  for (int half = kWidth / 2; half > 0; half /= 2) {
    for (int l = 0; l < half; ++l) lanes[l] += lanes[l + half];
  }
  return lanes[0];
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

}  // namespace lucid

#endif  // LUCID_CSRC_SIMD_H_
