// The forward pass (see forward.h for the math).

#include "forward.h"

#include <algorithm>
#include <cmath>
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

// One instance's statistics from its mean and m2 (see RowMoments) over m =
// 1 / inv_m elements: the mean as a float and its rounding residual, the
// biased variance and r = 1 / sqrt(var + eps), 0 where var + eps is 0 (a
// constant instance with eps 0 normalizes to its bias, as in PyTorch). A NaN
// m2 stays NaN (rounding can leave m2 a little below 0, which is clamped).
// Branch-free (selects), so loops over instances vectorize.
struct Statistics {
  float mean, residual, var, rstd;
};

inline Statistics StatisticsOf(double mu, double m2, double inv_m, float eps) {
  const double v = m2 < 0.0 ? 0.0 : m2 * inv_m, s = v + eps;
  const float mean = static_cast<float>(mu);
  return {mean, static_cast<float>(mu - static_cast<double>(mean)), static_cast<float>(v),
          s == 0.0 ? 0.0f : static_cast<float>(1.0 / std::sqrt(s))};
}

// Rows of M contiguous elements (channels-first), [begin, end) of the
// (P*N*C, M) view, in groups (see RowGroup).
template <typename T>
void ForwardRows(const Shape& s, ForwardArgs<T> args, int64_t begin, int64_t end, bool stream) {
  const typename T::Storage* const x = args.x;
  typename T::Storage* const y = args.y;
  const float *const w = args.w, *const b = args.b;
  float *const mean = args.mean, *const residual = args.residual, *const var = args.var;
  const float eps = args.eps;
  const int64_t m = s.m, group = RowGroup(m * sizeof(typename T::Storage));
  const double inv_m = 1.0 / m;
  double mu[kGroup] = {}, m2[kGroup] = {};
  float mean_f[kGroup], e[kGroup], var_f[kGroup], r[kGroup];
  int64_t pc[kGroup];
  for (int64_t r0 = begin; r0 < end; r0 += group) {
    const int64_t rows = std::min(group, end - r0);
    const typename T::Storage* xg = x + r0 * m;
    GroupMoments<T>(xg, m, rows, mu, m2);
    // Every slot, a fixed trip count that vectorizes; slots past `rows` are unused.
#pragma omp simd
    for (int64_t j = 0; j < kGroup; ++j) {
      const Statistics mo = StatisticsOf(mu[j], m2[j], inv_m, eps);
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

// One channel block of a slab of M rows of C contiguous channels
// (channels-last); out_bytes is the size of the whole output.
template <typename T>
void ForwardSlab(const Shape& s, ForwardArgs<T> args, const ChannelBlock& blk, int64_t out_bytes) {
  const int64_t m = s.m, c = s.c, width = blk.c1 - blk.c0;
  const typename T::Storage* const x = args.x + blk.data(s);
  typename T::Storage* const y = args.y + blk.data(s);
  const float *const w = args.w + blk.param(s), *const b = args.b + blk.param(s);
  float *const mean_out = args.mean + blk.stat(s), *const residual_out = args.residual + blk.stat(s),
               *const var_out = args.var + blk.stat(s);
  std::vector<double> mu(width), m2(width);
  std::vector<float> mean_f(width), e(width), a(width), bb(width);
  SlabMoments<T>(x, m, c, width, mu.data(), m2.data());
  const double inv_m = 1.0 / m;
  for (int64_t j = 0; j < width; ++j) {
    const Statistics mo = StatisticsOf(mu[j], m2[j], inv_m, args.eps);
    mean_f[j] = mo.mean;
    e[j] = mo.residual;
    a[j] = mo.rstd * w[j];
    bb[j] = b[j];
    mean_out[j] = mo.mean;
    residual_out[j] = mo.residual;
    var_out[j] = mo.var;
  }
  const float* const coef[4] = {mean_f.data(), e.data(), a.data(), bb.data()};
  SlabMap<T>(y, x, x, m, c, width, coef, CanStreamSlab(y, c, out_bytes),
             [](auto xi, auto, const auto* k) { return ((xi - k[0]) - k[1]) * k[2] + k[3]; });
}

}  // namespace

template <typename T>
void Forward(const Workers& workers, const Shape& s, const ForwardArgs<T>& args) {
  const int64_t bytes = s.instances() * s.m * static_cast<int64_t>(sizeof(typename T::Storage));
  AdviseHugePages(args.y, bytes);
  if (!s.channels_last) {
    ParallelFor(workers, s.instances(), bytes, [&](int64_t begin, int64_t end) {
      ForwardRows<T>(s, args, begin, end, bytes >= kStreamBytes);
    });
    return;
  }
  ForEachChannelBlock(workers, s, bytes, [&](const ChannelBlock& blk) { ForwardSlab<T>(s, args, blk, bytes); });
}

template void Forward<F32>(const Workers&, const Shape&, const ForwardArgs<F32>&);
template void Forward<BF16>(const Workers&, const Shape&, const ForwardArgs<BF16>&);

}  // namespace lucid
