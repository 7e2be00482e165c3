// The per-instance reductions both passes start with. The backward's sums,
// of a pair of terms computed from two inputs read side by side (gy and x):
// over one row of contiguous elements (RowSums), a group of short rows
// (GroupSums), or the channels of a channels-last slab (SlabSums). The
// forward's moments (mean and sum of squared deviations, see "moments"
// below) over the same three shapes: RowMoments, GroupMoments, SlabMoments.

#ifndef LUCID_CSRC_REDUCTIONS_H_
#define LUCID_CSRC_REDUCTIONS_H_

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "simd.h"

namespace lucid {

// The backward's sums run in float over blocks of this many elements (each
// SIMD lane adds a few terms), and the block sums accumulate in double: float
// speed, near-double accuracy. (The forward's moments have blocks of their
// own, see "moments".)
constexpr int64_t kBlock = 256;

// The per-lane partial sums (u, v) of terms over n elements (a block, a few
// hundred), where terms(a_i, b_i, u, v) gives the i-th pair from the i-th
// elements of a and b (as floats, or as a Vec for kWidth at once). kAcc
// independent vector accumulators per sum hide the latency of the
// additions; a partial last vector is padded and its extra lanes dropped.
template <int kAcc, typename T, typename Terms>
inline void Partials(const typename T::Storage* a, const typename T::Storage* b, int64_t n, Terms terms, Vec* u,
                     Vec* v) {
  Vec pu[kAcc] = {}, pv[kAcc] = {};
  int64_t i = 0;
  for (; i + kAcc * kWidth <= n; i += kAcc * kWidth) {
    for (int j = 0; j < kAcc; ++j) {
      Vec p, q;
      terms(LoadVec(a, i + kWidth * j), LoadVec(b, i + kWidth * j), p, q);
      pu[j] += p;
      pv[j] += q;
    }
  }
  for (int j = 0; i + kWidth <= n; i += kWidth, ++j) {
    Vec p, q;
    terms(LoadVec(a, i), LoadVec(b, i), p, q);
    pu[j] += p;
    pv[j] += q;
  }
  if (i < n) {
    typename T::Storage ta[kWidth] = {}, tb[kWidth] = {};
    std::memcpy(ta, a + i, (n - i) * sizeof(ta[0]));
    std::memcpy(tb, b + i, (n - i) * sizeof(tb[0]));
    const VecU32 keep = reinterpret_cast<VecU32>(Iota() < static_cast<int32_t>(n - i));
    Vec p, q;
    terms(LoadVec(ta, 0), LoadVec(tb, 0), p, q);
    pu[kAcc - 1] += reinterpret_cast<Vec>(reinterpret_cast<VecU32>(p) & keep);
    pv[kAcc - 1] += reinterpret_cast<Vec>(reinterpret_cast<VecU32>(q) & keep);
  }
  for (int half = kAcc / 2; half > 0; half /= 2) {
    for (int j = 0; j < half; ++j) {
      pu[j] += pu[j + half];
      pv[j] += pv[j + half];
    }
  }
  *u = pu[0];
  *v = pv[0];
}

// Per-lane double accumulators that outlive a block: a Vec's lanes as two
// vectors of kWidth / 2 doubles (each one register), its low and high halves.
typedef float VecHalf __attribute__((vector_size(2 * kWidth)));
typedef double VecD __attribute__((vector_size(4 * kWidth)));

inline void ToDouble(const Vec& v, VecD (&d)[2]) {
  VecHalf h[2];
  std::memcpy(h, &v, sizeof(h));
  d[0] = __builtin_convertvector(h[0], VecD);
  d[1] = __builtin_convertvector(h[1], VecD);
}

inline double HorizontalSum(const VecD (&d)[2]) {
  double lanes[kWidth];
  std::memcpy(lanes, d, sizeof(lanes));
  double t = 0.0;
  for (int l = 0; l < kWidth; ++l) t += lanes[l];
  return t;
}

// s1 = sum of u, s2 = sum of v over i in [0, m) (terms as in Partials): in
// float within each kBlock, in double across blocks (per lane, so that a
// block ends without a horizontal sum).
template <typename T, typename Terms>
inline void RowSums(const typename T::Storage* a, const typename T::Storage* b, int64_t m, Terms terms, double* s1,
                    double* s2) {
  VecD t1[2] = {}, t2[2] = {};
  auto add = [&](int64_t i0, int64_t n) {
    Vec u, v;
    Partials<4, T>(a + i0, b + i0, n, terms, &u, &v);
    VecD du[2], dv[2];
    ToDouble(u, du);
    ToDouble(v, dv);
    for (int h = 0; h < 2; ++h) {
      t1[h] += du[h];
      t2[h] += dv[h];
    }
  };
  int64_t i0 = 0;
  for (; i0 + kBlock <= m; i0 += kBlock) add(i0, kBlock);
  if (i0 < m) add(i0, m - i0);
  *s1 = HorizontalSum(t1);
  *s2 = HorizontalSum(t2);
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
      Partials<2, T>(
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

// One block of rows [i0, i1) of SlabSums: per channel j in [0, width), the
// float sums f1_j, f2_j of terms(j, a_ij, b_ij, u, v) over the block's rows
// (stride c) of a and b (j the first channel of a Vec of channels, or of one
// float).
template <typename T, typename Terms>
void SlabBlockSums(const typename T::Storage* a, const typename T::Storage* b, int64_t i0, int64_t i1, int64_t c,
                   int64_t width, Terms terms, float* f1, float* f2) {
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
      StoreVec(f1, j0 + q * kWidth, u[q]);
      StoreVec(f2, j0 + q * kWidth, v[q]);
    }
  });
  std::fill(f1 + tail, f1 + width, 0.0f);
  std::fill(f2 + tail, f2 + width, 0.0f);
  for (int64_t i = i0; i < i1; ++i) {
    for (int64_t j = tail; j < width; ++j) {
      float u, v;
      terms(j, T::Load(a + i * c, j), T::Load(b + i * c, j), u, v);
      f1[j] += u;
      f2[j] += v;
    }
  }
}

// The channels-last counterpart of RowSums: per channel j in [0, width), the
// sums of terms over the m rows (as in SlabBlockSums), in float over kBlock
// rows at a time and in double across them.
template <typename T, typename Terms>
void SlabSums(const typename T::Storage* a, const typename T::Storage* b, int64_t m, int64_t c, int64_t width,
              Terms terms, double* s1, double* s2) {
  std::vector<float> f1(width), f2(width);
  std::fill(s1, s1 + width, 0.0);
  std::fill(s2, s2 + width, 0.0);
  for (int64_t i0 = 0; i0 < m; i0 += kBlock) {
    SlabBlockSums<T>(a, b, i0, std::min(m, i0 + kBlock), c, width, terms, f1.data(), f2.data());
    for (int64_t j = 0; j < width; ++j) {
      s1[j] += f1[j];
      s2[j] += f2[j];
    }
  }
}

// --------------------------------------------------------------- moments --

// The forward's statistics: per instance the mean and m2, the sum of squared
// deviations from it, to about double precision whatever the data. The
// instance goes in blocks (of a row, a whole short row, or a block of rows of
// a channels-last slab; in L1), each centred on a float shift s near its
// mean: the float sums of d = x - s and d^2 give the block's mean
// s + sum(d)/n and m2 = sum(d^2) - sum(d)^2/n, and the blocks merge in double
// with Chan's parallel formula. The first block of an instance is read twice,
// its shift its own float mean (so sum(d)/n is a rounding error); every later
// block's shift is the previous block's mean, which saves that extra pass and
// is provably near: n (mean_prev - mean_b)^2 <= 2 n ((mean_prev - mu)^2 +
// (mean_b - mu)^2) for the instance's mean mu, so over all the blocks the
// squares that centring on the shifts adds come to at most 4 m2 (blocks of
// equal size; a last, shorter one adds less). sum(d^2) is then at most 5 m2
// and its rounding at most 5 times that of sums centred exactly: no offset of
// the data from zero and no element's place (a hot pixel first in its row,
// say) costs more than that. A NaN or infinity anywhere makes the instance's
// mean and m2 NaN.

// A block's merge weights: f = n_b/(n_a + n_b) and g = n_a f, for a block of
// n_b elements joining n_a already merged (the same for every channel of a
// slab's block of rows).
struct MergeWeights {
  double f, g;
};

inline MergeWeights WeightsOf(int64_t n_a, int64_t n_b) {
  const double f = static_cast<double>(n_b) / static_cast<double>(n_a + n_b);
  return {f, static_cast<double>(n_a) * f};
}

// Merges a block of n_b = 1 / inv_n elements, centred on `shift` with float
// sums sd = sum(d) and sd2 = sum(d^2), into (mean, m2) (Chan et al.: the m2
// of the union is the two m2 plus delta^2 n_a n_b / (n_a + n_b), delta the
// difference of the means), and returns the block's mean. Into (0, 0) with
// WeightsOf(0, n_b), it sets the block's own moments. D is double, or VecD
// for kWidth / 2 blocks at once.
template <typename D>
inline D MergeBlock(const D& shift, const D& sd, const D& sd2, double inv_n, MergeWeights w, D* mean, D* m2) {
  const D mean_b = shift + sd * inv_n, m2_b = sd2 - sd * sd * inv_n;
  const D delta = mean_b - *mean;
  *mean += delta * w.f;
  *m2 += m2_b + delta * delta * w.g;
  return mean_b;
}

// The terms of the passes over a block: x itself (its sum gives the first
// block's shift; the second sum is unused, zero, so its additions fold away),
// then d = x - shift and d^2 (shift a float, or a Vec of them).
struct SumOfX {
  template <typename V>
  void operator()(V x, V, V& u, V& v) const {
    u = x;
    v = V{};
  }
};

template <typename S>
struct Deviations {
  S shift;
  template <typename V>
  void operator()(V x, V, V& u, V& v) const {
    const V d = x - shift;
    u = d;
    v = d * d;
  }
};

// The moments of n contiguous elements as one block centred on `shift`,
// merged into (mean, m2) with weights w (kAcc as in Partials).
template <int kAcc, typename T>
inline void MergeAround(const typename T::Storage* x, int64_t n, float shift, MergeWeights w, double* mean,
                        double* m2) {
  Vec sd, sd2;
  Partials<kAcc, T>(x, x, n, Deviations<float>{shift}, &sd, &sd2);
  MergeBlock<double>(shift, HorizontalSum(sd), HorizontalSum(sd2), 1.0 / static_cast<double>(n), w, mean, m2);
}

// The moments of n contiguous elements as one block centred on its own float
// mean (a short row, or the end of a long one), merged into (mean, m2) with
// weights w.
template <typename T>
inline void MergeRowBlock(const typename T::Storage* x, int64_t n, MergeWeights w, double* mean, double* m2) {
  Vec s, unused;
  Partials<4, T>(x, x, n, SumOfX{}, &s, &unused);
  MergeAround<4, T>(x, n, HorizontalSum(s) / static_cast<float>(n), w, mean, m2);
}

// Two VecD halves as one Vec of floats.
inline Vec ToFloat(const VecD (&d)[2]) {
  const VecHalf h[2] = {__builtin_convertvector(d[0], VecHalf), __builtin_convertvector(d[1], VecHalf)};
  Vec v;
  std::memcpy(&v, h, sizeof(v));
  return v;
}

// The moments of one row of m contiguous elements, in blocks of
// kRowMomentBlock elements in which each SIMD lane keeps its own moments:
// lane l's block is the kLaneBlock elements at positions l mod kWidth,
// centred on the lane's previous block's mean (the first on its own) and
// merged into the lane's double moments, so a block ends without a
// horizontal sum or a division. The lanes, of equal counts, merge at the
// end of the row, and then a last partial block (MergeRowBlock).
constexpr int64_t kLaneBlock = 32;
constexpr int64_t kRowMomentBlock = kLaneBlock * kWidth;

template <typename T>
inline void RowMoments(const typename T::Storage* x, int64_t m, double* mean, double* m2) {
  const int64_t full = m / kRowMomentBlock;
  VecD mu[2] = {}, q[2] = {};
  Vec s, sd, sd2;
  if (full > 0) {
    Partials<4, T>(x, x, kRowMomentBlock, SumOfX{}, &s, &sd);
    s *= 1.0f / kLaneBlock;
  }
  for (int64_t k = 0; k < full; ++k) {
    const typename T::Storage* xb = x + k * kRowMomentBlock;
    Partials<4, T>(xb, xb, kRowMomentBlock, Deviations<Vec>{s}, &sd, &sd2);
    VecD ds[2], dsd[2], dsd2[2], mean_b[2];
    ToDouble(s, ds);
    ToDouble(sd, dsd);
    ToDouble(sd2, dsd2);
    const MergeWeights w = WeightsOf(k * kLaneBlock, kLaneBlock);
    for (int h = 0; h < 2; ++h) mean_b[h] = MergeBlock(ds[h], dsd[h], dsd2[h], 1.0 / kLaneBlock, w, &mu[h], &q[h]);
    s = ToFloat(mean_b);
  }
  double lane_mean[kWidth], lane_m2[kWidth];
  std::memcpy(lane_mean, mu, sizeof(mu));
  std::memcpy(lane_m2, q, sizeof(q));
  // Lanes of equal counts n: the mean is theirs averaged, m2 the sum of
  // theirs plus n times their squared deviations from it (no cancellation).
  double mean_all = 0.0, spread = 0.0, m2_all = 0.0;
  for (int l = 0; l < kWidth; ++l) mean_all += lane_mean[l];
  mean_all /= kWidth;
  for (int l = 0; l < kWidth; ++l) {
    const double dl = lane_mean[l] - mean_all;
    spread += dl * dl;
    m2_all += lane_m2[l];
  }
  m2_all += spread * static_cast<double>(full * kLaneBlock);
  const int64_t done = full * kRowMomentBlock;
  if (done < m) MergeRowBlock<T>(x + done, m - done, WeightsOf(done, m - done), &mean_all, &m2_all);
  *mean = mean_all;
  *m2 = m2_all;
}

// RowMoments for `rows` consecutive rows of m elements (a group, see
// RowGroup). Rows up to kBlock long are one block each and go kWidth rows at
// a time, each pass summed with TransposeSum (see GroupSums). Such a row is
// in L1, and short: one pass centred on its first element x0 usually
// suffices, and whether it did is known from its result. With d = x - x0,
// sum(d^2) = m2 + m (mean - x0)^2, so where m (mean - x0)^2 <= 4 m2 the float
// sums round no worse than those of a block centred on a nearby shift (at
// most 5 m2, the bound of RowMoments' later blocks). A row that fails the
// test (its first element far from its mean: a hot first pixel; or a NaN or
// an infinity, whose comparisons are false) takes a second pass centred on the
// mean the first gave, which is near it whatever the data.
constexpr double kMaxShiftSpread = 4.0;

template <typename T>
inline void GroupMoments(const typename T::Storage* x, int64_t m, int64_t rows, double* mean, double* m2) {
  if (m > kBlock) {
    for (int64_t j = 0; j < rows; ++j) RowMoments<T>(x + j * m, m, &mean[j], &m2[j]);
    return;
  }
  const MergeWeights w = WeightsOf(0, m);
  const double inv_m = 1.0 / static_cast<double>(m);
  for (int64_t j0 = 0; j0 < rows; j0 += kWidth) {
    const typename T::Storage* xg = x + j0 * m;
    const int64_t count = std::min<int64_t>(kWidth, rows - j0);
    float shift[kWidth];
    double sd[kWidth], sd2[kWidth];
    for (int64_t j = 0; j < count; ++j) shift[j] = T::Load(xg + j * m, 0);
    const auto around_x0 = [&shift](int64_t j, auto xi, auto, auto& u, auto& v) {
      Deviations<float>{shift[j]}(xi, xi, u, v);
    };
    GroupSums<T>(xg, xg, m, count, around_x0, sd, sd2);
    for (int64_t j = 0; j < count; ++j) {
      const double off = sd[j] * sd[j] * inv_m;  // off = m (mean - x0)^2
      double* row_mean = &mean[j0 + j];
      double* row_m2 = &m2[j0 + j];
      *row_mean = *row_m2 = 0.0;
      if (off <= kMaxShiftSpread * (sd2[j] - off)) {
        MergeBlock<double>(shift[j], sd[j], sd2[j], inv_m, w, row_mean, row_m2);
      } else {
        const float near = shift[j] + static_cast<float>(sd[j] * inv_m);
        MergeAround<2, T>(xg + j * m, m, near, w, row_mean, row_m2);
      }
    }
  }
}

// The channels-last counterpart: per channel j in [0, width), the moments of
// the m rows (stride c), in blocks of kSlabBlock rows, each channel's blocks
// centred as a row's (the first on its own mean, the others on the previous
// block's). Per block and channel group, the passes run down the block's
// rows with every channel's sums in registers; the last channels (under
// kWidth) go one at a time. A lane adds the rows of its block in turn, and a
// float sum in which one large term comes first rounds each later term
// against it (the same way, if the terms are alike: the zeros of a sparse map
// with a hot pixel), so the float sums go in chains of kSlabChain rows,
// added up in double (measured, a hot pixel in a sparse map: 2e-6 of the
// output's scale with float sums over 128 rows, 6e-7 over 8 rows added in
// float, 1e-7 with chains of 8 added in double). Blocks of many rows make the
// merges few (blocks of 32 rows cost the forward 15% on a channels-last
// benchmark shape).
constexpr int64_t kSlabChain = 8;
constexpr int64_t kSlabBlock = 16 * kSlabChain;

inline VecD LoadVecD(const double* p, int64_t i) {
  VecD v;
  std::memcpy(&v, p + i, sizeof(v));
  return v;
}

inline void StoreVecD(double* p, int64_t i, const VecD& v) { std::memcpy(p + i, &v, sizeof(v)); }

template <typename T>
void SlabMoments(const typename T::Storage* x, int64_t m, int64_t c, int64_t width, double* mean, double* m2) {
  std::vector<float> shift(width);  // each channel's next shift
  std::fill(mean, mean + width, 0.0);
  std::fill(m2, m2 + width, 0.0);
  for (int64_t i0 = 0; i0 < m; i0 += kSlabBlock) {
    const int64_t i1 = std::min(m, i0 + kSlabBlock), n = i1 - i0;
    const MergeWeights w = WeightsOf(i0, n);
    const double inv_n = 1.0 / static_cast<double>(n);
    const float inv_nf = 1.0f / static_cast<float>(n);
    const int64_t tail = ForEachChannelGroup(width, [&](auto nv, int64_t j0) {
      constexpr int NV = decltype(nv)::value;
      Vec s[NV] = {};
      if (i0 == 0) {
        for (int64_t i = i0; i < i1; ++i) {
          for (int q = 0; q < NV; ++q) s[q] += LoadVec(x + i * c + j0, q * kWidth);
        }
        for (int q = 0; q < NV; ++q) s[q] *= inv_nf;
      } else {
        for (int q = 0; q < NV; ++q) s[q] = LoadVec(shift.data(), j0 + q * kWidth);
      }
      VecD su[NV][2] = {}, sv[NV][2] = {};
      for (int64_t k0 = i0; k0 < i1; k0 += kSlabChain) {
        Vec u[NV] = {}, v[NV] = {};
        for (int64_t i = k0; i < std::min(i1, k0 + kSlabChain); ++i) {
          for (int q = 0; q < NV; ++q) {
            const Vec xq = LoadVec(x + i * c + j0, q * kWidth);
            Vec p, r;
            Deviations<Vec>{s[q]}(xq, xq, p, r);
            u[q] += p;
            v[q] += r;
          }
        }
        for (int q = 0; q < NV; ++q) {
          VecD du[2], dv[2];
          ToDouble(u[q], du);
          ToDouble(v[q], dv);
          for (int h = 0; h < 2; ++h) {
            su[q][h] += du[h];
            sv[q][h] += dv[h];
          }
        }
      }
      for (int q = 0; q < NV; ++q) {
        VecD ds[2], mean_b[2];
        ToDouble(s[q], ds);
        for (int h = 0; h < 2; ++h) {
          const int64_t j = j0 + q * kWidth + h * (kWidth / 2);
          VecD mu = LoadVecD(mean, j), sq = LoadVecD(m2, j);
          mean_b[h] = MergeBlock(ds[h], su[q][h], sv[q][h], inv_n, w, &mu, &sq);
          StoreVecD(mean, j, mu);
          StoreVecD(m2, j, sq);
        }
        StoreVec(shift.data(), j0 + q * kWidth, ToFloat(mean_b));
      }
    });
    for (int64_t j = tail; j < width; ++j) {
      float s = shift[j];
      if (i0 == 0) {
        s = 0.0f;
        for (int64_t i = i0; i < i1; ++i) s += T::Load(x + i * c, j);
        s *= inv_nf;
      }
      double su = 0.0, sv = 0.0;
      for (int64_t k0 = i0; k0 < i1; k0 += kSlabChain) {
        float u = 0.0f, v = 0.0f;
        for (int64_t i = k0; i < std::min(i1, k0 + kSlabChain); ++i) {
          const float xj = T::Load(x + i * c, j);
          float p, r;
          Deviations<float>{s}(xj, xj, p, r);
          u += p;
          v += r;
        }
        su += u;
        sv += v;
      }
      shift[j] = static_cast<float>(MergeBlock<double>(s, su, sv, inv_n, w, &mean[j], &m2[j]));
    }
  }
}

}  // namespace lucid

#endif  // LUCID_CSRC_REDUCTIONS_H_
