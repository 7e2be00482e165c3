// lucid's native CPU kernels for instance norm, forward and backward, called
// from XLA through the typed FFI (jax.ffi.ffi_call). This file holds the two
// exported handlers, their checks of XLA's buffers, and the one dispatch from
// x's dtype to the kernels' element types.
//
// Instance norm is memory-bound: the floor is one read of the input and one
// write of the output. XLA's CPU backend reads the input twice forward (once
// for the statistics, once to normalize), because it will not keep one
// instance's data in cache between a reduction and the elementwise pass that
// consumes it. These kernels do exactly that: every instance (a row of the
// (N*C, M) view, or a channel block of an (N, M, C) slab) is read from memory
// once, then revisited from cache.
//
// Where the rest is: the math in forward.h and backward.h; the sums and the
// elementwise passes in reductions.h and maps.h, on vectors of kWidth floats
// (16 with AVX-512) from simd.h; the layouts, groups of short rows and channel
// blocks in layout.h; the threads, XLA's intra-op pool, in threading.h; huge
// pages for large outputs in memory.h.
//
// setup.py compiles these sources once per instruction-set path, each into a
// library of its own (see simd.h); csrc/exports.map keeps every symbol but
// the handlers private to its library.

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <initializer_list>
#include <limits>
#include <string>
#include <utility>

#include "backward.h"
#include "forward.h"
#include "layout.h"
#include "simd.h"
#include "threading.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

// The library's only exported symbols: it is built with hidden visibility,
// and XLA's handler macro (below) gives them none of their own.
extern "C" {
__attribute__((visibility("default"))) XLA_FFI_Error* LucidInstanceNormForward(XLA_FFI_CallFrame* call_frame);
__attribute__((visibility("default"))) XLA_FFI_Error* LucidInstanceNormBackward(XLA_FFI_CallFrame* call_frame);
}

namespace lucid {
namespace {

ffi::Error Invalid(const char* what) { return ffi::Error::InvalidArgument(std::string("lucid kernel: ") + what); }

// x's shape (see Shape; the attribute channels_last is nonzero for
// (P, N, M, C)). Empty dimensions are allowed (see the handlers).
ffi::Error ReadShape(ffi::AnyBuffer::Dimensions dims, int64_t channels_last, Shape* s) {
  if (dims.size() < 3) return Invalid("x must have at least 3 dims");
  const int64_t r = dims.size();
  s->n = dims[r - 3];
  s->c = channels_last ? dims[r - 1] : dims[r - 2];
  s->m = channels_last ? dims[r - 2] : dims[r - 1];
  s->channels_last = channels_last != 0;
  // With an empty dimension elsewhere, the product of the others is no longer bounded by the
  // buffer's size: P, P*C and P*N*C (the sizes the other buffers are checked against) must not overflow.
  bool overflow = false;
  s->p = 1;
  for (int64_t i = 0; i + 3 < r; ++i) overflow |= __builtin_mul_overflow(s->p, dims[i], &s->p);
  int64_t pc, pnc;
  overflow |= __builtin_mul_overflow(s->p, s->c, &pc) || __builtin_mul_overflow(pc, s->n, &pnc);
  return overflow ? Invalid("x's dimensions are too large") : ffi::Error::Success();
}

// The kernels' element types: the dtypes x (and y, gy, gx) may have.
bool SupportedElementType(ffi::DataType dtype) { return dtype == ffi::F32 || dtype == ffi::BF16; }

// Every buffer is checked against x before the kernels touch memory: the
// handlers are registered globally, and any ffi_call may reach them with
// buffers of any shape. Typed float32 buffers have had their dtype checked
// by XLA's decoder; sizes are checked here.
ffi::Error CheckLikeX(const ffi::AnyBuffer& x, ffi::DataType dtype, size_t count, const char* what) {
  if (dtype != x.element_type() || count != x.element_count()) return Invalid(what);
  return ffi::Error::Success();
}

ffi::Error CheckSizes(std::initializer_list<size_t> sizes, int64_t expected, const char* what) {
  for (size_t size : sizes) {
    if (static_cast<int64_t>(size) != expected) return Invalid(what);
  }
  return ffi::Error::Success();
}

// Workers on XLA's intra-op thread pool; the handler's own thread is one of
// the pool's threads or waits on them, so at most num_threads - 1 helpers.
Workers PoolWorkers(ffi::ThreadPool& pool) {
  return {std::max<int64_t>(0, pool.num_threads() - 1),
          [&pool](std::function<void()> task) { pool.Schedule(std::move(task)); }};
}

// Calls kernel(T{}) with the element-type tag T (F32 or BF16) of `dtype`,
// one of the SupportedElementType.
template <typename Kernel>
void WithElementType(ffi::DataType dtype, Kernel&& kernel) {
  if (dtype == ffi::BF16) {
    kernel(BF16{});
  } else {
    kernel(F32{});
  }
}

// A buffer's data as elements of type T.
template <typename T>
typename T::Storage* StorageOf(void* data) {
  return static_cast<typename T::Storage*>(data);
}

// Empty inputs: nothing is read. With instances but no elements in them
// (M == 0), the statistics are what their formulas give over an empty set,
// as in XLA and PyTorch: the forward's mean, residual and variance are 0/0,
// NaN; the backward's sums g1 and g2 are 0. (lucid's Python layer returns
// before calling the kernels on empty inputs: this is for direct callers.)
ffi::Error ForwardImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::Buffer<ffi::F32> w, ffi::Buffer<ffi::F32> b,
                       ffi::Result<ffi::AnyBuffer> y, ffi::ResultBuffer<ffi::F32> mean,
                       ffi::ResultBuffer<ffi::F32> residual, ffi::ResultBuffer<ffi::F32> var, float eps,
                       int64_t channels_last) {
  if (!SupportedElementType(x.element_type())) return Invalid("x must be float32 or bfloat16");
  Shape s;
  if (auto err = ReadShape(x.dimensions(), channels_last, &s); err.failure()) return err;
  if (auto err = CheckSizes({w.element_count(), b.element_count()}, s.p * s.c, "weight and bias must have P*C elements");
      err.failure()) {
    return err;
  }
  if (auto err = CheckLikeX(x, y->element_type(), y->element_count(), "y must have x's dtype and size");
      err.failure()) {
    return err;
  }
  if (auto err = CheckSizes({mean->element_count(), residual->element_count(), var->element_count()},
                            s.instances(), "mean, residual and var must have P*N*C elements");
      err.failure()) {
    return err;
  }
  if (s.instances() == 0) return ffi::Error::Success();
  if (s.m == 0) {
    for (float* stat : {mean->typed_data(), residual->typed_data(), var->typed_data()}) {
      std::fill_n(stat, s.instances(), std::numeric_limits<float>::quiet_NaN());
    }
    return ffi::Error::Success();
  }
  const Workers workers = PoolWorkers(pool);
  WithElementType(x.element_type(), [&](auto tag) {
    using T = decltype(tag);
    const ForwardArgs<T> args{StorageOf<T>(x.untyped_data()), w.typed_data(),      b.typed_data(),
                              eps,                            StorageOf<T>(y->untyped_data()),
                              mean->typed_data(),             residual->typed_data(), var->typed_data()};
    Forward<T>(workers, s, args);
  });
  return ffi::Error::Success();
}

ffi::Error BackwardImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer gy, ffi::Buffer<ffi::F32> mean,
                        ffi::Buffer<ffi::F32> residual, ffi::Buffer<ffi::F32> rstd, ffi::Buffer<ffi::F32> w,
                        ffi::Buffer<ffi::F32> gmean, ffi::Buffer<ffi::F32> gvar, ffi::Result<ffi::AnyBuffer> gx,
                        ffi::ResultBuffer<ffi::F32> g1, ffi::ResultBuffer<ffi::F32> g2, int64_t channels_last) {
  if (!SupportedElementType(x.element_type())) return Invalid("x must be float32 or bfloat16");
  Shape s;
  if (auto err = ReadShape(x.dimensions(), channels_last, &s); err.failure()) return err;
  if (auto err = CheckSizes({w.element_count()}, s.p * s.c, "weight must have P*C elements"); err.failure()) {
    return err;
  }
  if (auto err = CheckSizes({mean.element_count(), residual.element_count(), rstd.element_count(),
                             gmean.element_count(), gvar.element_count(), g1->element_count(), g2->element_count()},
                            s.instances(), "statistics, their cotangents, g1 and g2 must have P*N*C elements");
      err.failure()) {
    return err;
  }
  if (auto err = CheckLikeX(x, gy.element_type(), gy.element_count(), "gy must have x's dtype and size");
      err.failure()) {
    return err;
  }
  if (auto err = CheckLikeX(x, gx->element_type(), gx->element_count(), "gx must have x's dtype and size");
      err.failure()) {
    return err;
  }
  if (s.instances() == 0) return ffi::Error::Success();
  if (s.m == 0) {
    std::fill_n(g1->typed_data(), s.instances(), 0.0f);
    std::fill_n(g2->typed_data(), s.instances(), 0.0f);
    return ffi::Error::Success();
  }
  const Workers workers = PoolWorkers(pool);
  WithElementType(x.element_type(), [&](auto tag) {
    using T = decltype(tag);
    const BackwardArgs<T> args{StorageOf<T>(x.untyped_data()),  StorageOf<T>(gy.untyped_data()),
                               mean.typed_data(),               residual.typed_data(),
                               rstd.typed_data(),               w.typed_data(),
                               gmean.typed_data(),              gvar.typed_data(),
                               StorageOf<T>(gx->untyped_data()), g1->typed_data(),
                               g2->typed_data()};
    Backward<T>(workers, s, args);
  });
  return ffi::Error::Success();
}

}  // namespace
}  // namespace lucid

XLA_FFI_DEFINE_HANDLER_SYMBOL(LucidInstanceNormForward, lucid::ForwardImpl,
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

XLA_FFI_DEFINE_HANDLER_SYMBOL(LucidInstanceNormBackward, lucid::BackwardImpl,
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
