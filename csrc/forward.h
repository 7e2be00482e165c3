// The forward pass: y and the per-instance statistics from x.
//
// Per instance of M elements: its mean mu and m2 = sum((x - mu)^2), to about
// double precision on any data (RowMoments, GroupMoments and SlabMoments in
// reductions.h): blocks in L1, each centred on a float shift near its own
// mean (the first block of an instance on its own mean, read twice; each
// later one on the previous block's mean, provably near), float sums of
// d = x - shift and d^2 per block, the blocks merged in double with Chan's
// formula. Then
//     var = m2 / M, r = 1/sqrt(var + eps), or 0 where var + eps = 0,
//     y = ((x - mean_f) - e) * (r w) + b
// where mean_f is the mean rounded to float and e = mu - mean_f is the
// rounding residual, so the centring stays exact far from zero. A NaN or an
// infinity in an instance makes its mean and variance NaN (never clamped to
// 0; other instances are untouched); r = 0 makes a constant instance with
// eps = 0 its bias exactly, as in PyTorch. Each instance is read from memory
// once (the statistics) and normalized from cache.

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
