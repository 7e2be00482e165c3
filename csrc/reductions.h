// The per-instance sums both passes start with: over one row of contiguous
// elements (RowSums), a group of short rows (GroupSums), or the channels of a
// channels-last slab (SlabSums), each of a pair of terms computed from two
// inputs read side by side (x and x forward; gy and x backward).

#ifndef LUCID_CSRC_REDUCTIONS_H_
#define LUCID_CSRC_REDUCTIONS_H_

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "simd.h"

namespace lucid {

// Sums run in float over blocks of this many elements (each SIMD lane adds a
// few dozen terms), and the block sums accumulate in double: float speed,
// near-double accuracy.
constexpr int64_t kBlock = 256;

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

}  // namespace lucid

#endif  // LUCID_CSRC_REDUCTIONS_H_
