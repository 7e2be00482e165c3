// The backward pass: the transpose of the tangent map (instance_tangent in
// lucid/nn/_stats.py). Given the cotangents gy of y, gm of the mean
// and gv of the variance, with xhat = ((x - mean_f) - e) r (the forward's
// statistics, see forward.h; r comes from the caller, 0 where var + eps = 0):
//     g1 = sum(gy), g2 = sum(gy xhat)              (one read of x and gy)
//     gx = r w (gy - (g1 + xhat g2)/M) + (gm + 2 gv (x - mean))/M   (from cache)
// computed as gx = a gy + q ((x - mean_f) - e) + (gm - a g1)/M with a = r w
// and q = (2 gv - a g2 r)/M: no division by r, so every coefficient stays
// finite with r = 0 (gx is then the mean's and the variance's own part).
// The per-instance g1, g2 are returned: the weight and bias gradients are
// their sums over the batch, a small reduction left to XLA.

#ifndef LUCID_CSRC_BACKWARD_H_
#define LUCID_CSRC_BACKWARD_H_

#include "layout.h"
#include "simd.h"
#include "threading.h"

namespace lucid {

// One backward call's buffers; x, gy and gx hold T::Storage (see Shape for
// their layout), the rest float32. Passed by value, as ForwardArgs.
template <typename T>
struct BackwardArgs {
  using Storage = typename T::Storage;
  const Storage* x;
  const Storage* gy;
  const float* mean;  // the forward's statistics, P*N*C each: mean_f, e and r
  const float* residual;
  const float* rstd;
  const float* w;  // weight: P*C
  const float* gmean;  // cotangents of the mean and the variance: P*N*C each
  const float* gvar;
  Storage* gx;
  float* g1;  // P*N*C each
  float* g2;
};

// Writes gx, g1 and g2, for T in {F32, BF16}.
template <typename T>
void Backward(const Workers& workers, const Shape& s, const BackwardArgs<T>& args);

extern template void Backward<F32>(const Workers&, const Shape&, const BackwardArgs<F32>&);
extern template void Backward<BF16>(const Workers&, const Shape&, const BackwardArgs<BF16>&);

}  // namespace lucid

#endif  // LUCID_CSRC_BACKWARD_H_
