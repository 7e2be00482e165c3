// The forward pass: y and the per-instance statistics from x.
//
// Per instance, with k the first element (a shift close to the data) and the
// sums accumulated in double (see kBlock):
//     s1 = sum(x - k), s2 = sum((x - k)^2), mean = k + s1/M,
//     var = max(s2/M - (s1/M)^2, 0), r = 1/sqrt(var + eps),
//     y = ((x - mean_f) - e) * (r w) + b
// where mean_f is the mean rounded to float and e = mean - mean_f is the
// rounding residual, so the centring stays exact far from zero. Each
// instance is read from memory once (the sums) and normalized from cache.

#ifndef LUCID_CSRC_FORWARD_H_
#define LUCID_CSRC_FORWARD_H_

#include "layout.h"
#include "simd.h"
#include "threading.h"

namespace lucid {

// One forward call's buffers; x and y hold T::Storage (see Shape for their
// layout), the rest float32. The workers take it by value: GCC then knows its
// pointers come from the caller, not from memory that an escaped pointer
// (to a worker's scratch vectors, say) may have written, and spares the slab
// loops run-time alias checks (measured: 17% more instructions without, on a
// channels-last shape whose C is not a multiple of kWidth).
template <typename T>
struct ForwardArgs {
  using Storage = typename T::Storage;
  const Storage* x;
  const float* w;  // weight and bias: P*C each
  const float* b;
  float eps;
  Storage* y;
  float* mean;  // P*N*C each: mean_f, e and var
  float* residual;
  float* var;
};

// Normalizes x into y and writes the statistics, for T in {F32, BF16}.
template <typename T>
void Forward(const Workers& workers, const Shape& s, const ForwardArgs<T>& args);

extern template void Forward<F32>(const Workers&, const Shape&, const ForwardArgs<F32>&);
extern template void Forward<BF16>(const Workers&, const Shape&, const ForwardArgs<BF16>&);

}  // namespace lucid

#endif  // LUCID_CSRC_FORWARD_H_
