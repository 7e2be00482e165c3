// The backward pass (see backward.h for the math).

#include "backward.h"

#include <algorithm>
#include <cstdint>
#include <vector>

#include "layout.h"
#include "maps.h"
#include "memory.h"
#include "reductions.h"
#include "simd.h"
#include "threading.h"

namespace lucid {
namespace {

// The per-instance coefficients of gx = gy * a + (x - mean_f) * q + z, from
// g1 = sum(gy) and g2 = sum(gy xhat) (see backward.h). No division by r:
// with r = 0 (var + eps = 0) every coefficient stays finite.
struct BackwardCoefficients {
  float a, q, z;
};

inline BackwardCoefficients Coefficients(double g1, double g2, int64_t m, float e, float r, float w, float gm,
                                         float gv) {
  const double a = static_cast<double>(r) * w;
  const double q = (2.0 * gv - a * g2 * r) / m;
  const double z = (gm - a * g1) / m - e * q;
  return {static_cast<float>(a), static_cast<float>(q), static_cast<float>(z)};
}

// Rows of M contiguous elements (channels-first), [begin, end) of the
// (P*N*C, M) view, in groups (see RowGroup).
template <typename T>
void BackwardRows(const Shape& s, BackwardArgs<T> args, int64_t begin, int64_t end, bool stream) {
  const typename T::Storage *const x = args.x, *const gy = args.gy;
  typename T::Storage* const gx = args.gx;
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

// One channel block of a slab of M rows of C contiguous channels
// (channels-last); out_bytes is the size of the whole gx.
template <typename T>
void BackwardSlab(const Shape& s, BackwardArgs<T> args, const ChannelBlock& blk, int64_t out_bytes) {
  const int64_t m = s.m, c = s.c, width = blk.c1 - blk.c0, st = blk.stat(s);
  const typename T::Storage *const x = args.x + blk.data(s), *const gy = args.gy + blk.data(s);
  typename T::Storage* const gx = args.gx + blk.data(s);
  const float *const r = args.rstd + st, *const w = args.w + blk.param(s), *const gm = args.gmean + st,
              *const gv = args.gvar + st;
  std::vector<double> s1(width), s2(width);
  std::vector<float> a(width), q(width), z(width), mf(args.mean + st, args.mean + st + width),
      ef(args.residual + st, args.residual + st + width);
  SlabSums<T>(
      gy, x, m, c, width,
      [mf = mf.data(), ef = ef.data()](int64_t j, auto g, auto xj, auto& u, auto& v) {
        using V = decltype(g);
        u = g;
        v = g * ((xj - Lanes<V>(mf, j)) - Lanes<V>(ef, j));
      },
      s1.data(), s2.data());
  for (int64_t j = 0; j < width; ++j) {
    const double g2 = s2[j] * r[j];
    const BackwardCoefficients k = Coefficients(s1[j], g2, m, ef[j], r[j], w[j], gm[j], gv[j]);
    a[j] = k.a;
    q[j] = k.q;
    z[j] = k.z;
    args.g1[st + j] = static_cast<float>(s1[j]);
    args.g2[st + j] = static_cast<float>(g2);
  }
  const float* const coef[4] = {a.data(), mf.data(), q.data(), z.data()};
  SlabMap<T>(gx, gy, x, m, c, width, coef, CanStreamSlab(gx, c, out_bytes),
             [](auto g, auto xi, const auto* k) { return g * k[0] + (xi - k[1]) * k[2] + k[3]; });
}

}  // namespace

template <typename T>
void Backward(const Workers& workers, const Shape& s, const BackwardArgs<T>& args) {
  const int64_t out_bytes = s.instances() * s.m * static_cast<int64_t>(sizeof(typename T::Storage));
  const int64_t bytes = 3 * out_bytes;
  AdviseHugePages(args.gx, out_bytes);
  if (!s.channels_last) {
    ParallelFor(workers, s.instances(), bytes, [&](int64_t begin, int64_t end) {
      BackwardRows<T>(s, args, begin, end, out_bytes >= kStreamBytes);
    });
    return;
  }
  ForEachChannelBlock(workers, s, bytes,
                      [&](const ChannelBlock& blk) { BackwardSlab<T>(s, args, blk, out_bytes); });
}

template void Backward<F32>(const Workers&, const Shape&, const BackwardArgs<F32>&);
template void Backward<BF16>(const Workers&, const Shape&, const BackwardArgs<BF16>&);

}  // namespace lucid
