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

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <functional>
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

// x's shape (see Shape; the attribute channels_last is nonzero for
// (P, N, M, C)), checked against the weight's size.
ffi::Error ReadShape(ffi::AnyBuffer::Dimensions dims, int64_t channels_last, int64_t param_size, Shape* s) {
  if (dims.size() < 3) return ffi::Error::InvalidArgument("lucid kernel: x must have at least 3 dims");
  int64_t r = dims.size();
  s->n = dims[r - 3];
  s->c = channels_last ? dims[r - 1] : dims[r - 2];
  s->m = channels_last ? dims[r - 2] : dims[r - 1];
  s->p = 1;
  for (int64_t i = 0; i + 3 < r; ++i) s->p *= dims[i];
  s->channels_last = channels_last != 0;
  if (s->c <= 0 || param_size != s->p * s->c) {
    return ffi::Error::InvalidArgument("lucid kernel: weight/bias size must be P*C");
  }
  return ffi::Error::Success();
}

// Workers on XLA's intra-op thread pool; the handler's own thread is one of
// the pool's threads or waits on them, so at most num_threads - 1 helpers.
Workers PoolWorkers(ffi::ThreadPool& pool) {
  return {std::max<int64_t>(0, pool.num_threads() - 1),
          [&pool](std::function<void()> task) { pool.Schedule(std::move(task)); }};
}

// Calls kernel(T{}) with the element-type tag T (F32 or BF16) of `dtype`.
template <typename Kernel>
ffi::Error WithElementType(ffi::DataType dtype, Kernel&& kernel) {
  switch (dtype) {
    case ffi::F32:
      kernel(F32{});
      return ffi::Error::Success();
    case ffi::BF16:
      kernel(BF16{});
      return ffi::Error::Success();
    default:
      return ffi::Error::InvalidArgument("lucid kernel: x must be float32 or bfloat16");
  }
}

// A buffer's data as elements of type T.
template <typename T>
typename T::Storage* StorageOf(void* data) {
  return static_cast<typename T::Storage*>(data);
}

ffi::Error ForwardImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::Buffer<ffi::F32> w, ffi::Buffer<ffi::F32> b,
                       ffi::Result<ffi::AnyBuffer> y, ffi::ResultBuffer<ffi::F32> mean,
                       ffi::ResultBuffer<ffi::F32> residual, ffi::ResultBuffer<ffi::F32> var, float eps,
                       int64_t channels_last) {
  Shape s;
  if (auto err = ReadShape(x.dimensions(), channels_last, w.element_count(), &s); err.failure()) return err;
  if (b.element_count() != w.element_count()) return ffi::Error::InvalidArgument("lucid kernel: bias size");
  if (s.m <= 0) return ffi::Error::Success();
  const Workers workers = PoolWorkers(pool);
  return WithElementType(x.element_type(), [&](auto tag) {
    using T = decltype(tag);
    const ForwardArgs<T> args{StorageOf<T>(x.untyped_data()), w.typed_data(),      b.typed_data(),
                              eps,                            StorageOf<T>(y->untyped_data()),
                              mean->typed_data(),             residual->typed_data(), var->typed_data()};
    Forward<T>(workers, s, args);
  });
}

ffi::Error BackwardImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer gy, ffi::Buffer<ffi::F32> mean,
                        ffi::Buffer<ffi::F32> residual, ffi::Buffer<ffi::F32> rstd, ffi::Buffer<ffi::F32> w,
                        ffi::Buffer<ffi::F32> gmean, ffi::Buffer<ffi::F32> gvar, ffi::Result<ffi::AnyBuffer> gx,
                        ffi::ResultBuffer<ffi::F32> g1, ffi::ResultBuffer<ffi::F32> g2, int64_t channels_last) {
  Shape s;
  if (auto err = ReadShape(x.dimensions(), channels_last, w.element_count(), &s); err.failure()) return err;
  for (size_t size : {mean.element_count(), residual.element_count(), rstd.element_count(),
                      gmean.element_count(), gvar.element_count()}) {
    if (static_cast<int64_t>(size) != s.instances()) {
      return ffi::Error::InvalidArgument("lucid kernel: statistics must have P*N*C elements");
    }
  }
  if (gy.element_type() != x.element_type() || gy.element_count() != x.element_count()) {
    return ffi::Error::InvalidArgument("lucid kernel: gy must match x");
  }
  if (s.m <= 0) return ffi::Error::Success();
  const Workers workers = PoolWorkers(pool);
  return WithElementType(x.element_type(), [&](auto tag) {
    using T = decltype(tag);
    const BackwardArgs<T> args{StorageOf<T>(x.untyped_data()),  StorageOf<T>(gy.untyped_data()),
                               mean.typed_data(),               residual.typed_data(),
                               rstd.typed_data(),               w.typed_data(),
                               gmean.typed_data(),              gvar.typed_data(),
                               StorageOf<T>(gx->untyped_data()), g1->typed_data(),
                               g2->typed_data()};
    Backward<T>(workers, s, args);
  });
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
