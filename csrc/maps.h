// The elementwise pass both kernels end with, once an instance's
// coefficients are known: out = fn(a, b) over a row (MapRow, MapRowFromEnd)
// or over the channels of a channels-last slab (SlabMap), revisiting inputs
// the sums have just read, and writing large outputs around the caches.

#ifndef LUCID_CSRC_MAPS_H_
#define LUCID_CSRC_MAPS_H_

#include <algorithm>
#include <cstdint>

#include "reductions.h"
#include "simd.h"

namespace lucid {

// Row-layout outputs at least this large are written with non-temporal
// stores: they would not stay in cache for their consumer anyway (measured on
// the large benchmark shapes: forward 15-30% faster, backward about 10%).
constexpr int64_t kStreamBytes = int64_t{16} << 20;

// out[i] = fn(a[i], b[i]) for i in [0, m); fn takes and returns floats or
// Vecs. With stream, the vector stores bypass the caches (see StreamVec), and
// a non-null `next` (the input the caller reads after this row, m elements
// or more) is prefetched alongside: its reads from memory then overlap these
// writes instead of following them (measured: the forward 10-15% faster on
// the large benchmark shapes; the backward, with two inputs, was not).
template <typename T, typename Fn>
inline void MapRow(typename T::Storage* out, const typename T::Storage* a, const typename T::Storage* b, int64_t m,
                   bool stream, Fn fn, const typename T::Storage* next = nullptr) {
  int64_t i = 0;
  if (stream && kCanStream) {
    constexpr uintptr_t kAlign = kWidth * sizeof(typename T::Storage);
    for (; i < m && reinterpret_cast<uintptr_t>(out + i) % kAlign != 0; ++i) {
      T::Store(out, i, fn(T::Load(a, i), T::Load(b, i)));
    }
    if (next != nullptr) {
      for (; i + kWidth <= m; i += kWidth) {
        __builtin_prefetch(next + i, 0, 3);
        StreamVec(out, i, fn(LoadVec(a, i), LoadVec(b, i)));
      }
    }
    for (; i + kWidth <= m; i += kWidth) StreamVec(out, i, fn(LoadVec(a, i), LoadVec(b, i)));
  }
  for (; i + kWidth <= m; i += kWidth) StoreVec(out, i, fn(LoadVec(a, i), LoadVec(b, i)));
  for (; i < m; ++i) T::Store(out, i, fn(T::Load(a, i), T::Load(b, i)));
}

// MapRow over a row in chunks of kChunk elements, last chunk first: the
// preceding pass over the row (its sums) read the end last, so with rows
// larger than the cache that end is still there (measured: forward and
// backward 10-20% faster on rows of 768 KB; no change on rows that fit).
template <typename T, typename Fn>
inline void MapRowFromEnd(typename T::Storage* out, const typename T::Storage* a, const typename T::Storage* b,
                          int64_t m, bool stream, Fn fn, const typename T::Storage* next = nullptr) {
  constexpr int64_t kChunk = 4096;
  for (int64_t hi = m; hi > 0;) {
    const int64_t lo = (hi - 1) / kChunk * kChunk;
    MapRow<T>(out + lo, a + lo, b + lo, hi - lo, stream, fn, next != nullptr ? next + lo : nullptr);
    hi = lo;
  }
}

// The channels-last counterpart of MapRow, in blocks of kBlock rows and the
// channel groups of SlabSums (whatever blocks its sums used): out_ij = fn(a_ij, b_ij, k) over m rows (stride c) and
// channels [0, width), where k points to the channel's (or Vec of channels')
// four constants, one from each of coef[0..3]. With stream, vector stores
// bypass the caches (rows and out aligned to them, see CanStreamSlab).
template <typename T, typename Fn>
void SlabMap(typename T::Storage* out, const typename T::Storage* a, const typename T::Storage* b, int64_t m,
             int64_t c, int64_t width, const float* const (&coef)[4], bool stream, Fn fn) {
  for (int64_t i0 = 0; i0 < m; i0 += kBlock) {
    const int64_t i1 = std::min(m, i0 + kBlock);
    const int64_t tail = ForEachChannelGroup(width, [&](auto nv, int64_t j0) {
      constexpr int NV = decltype(nv)::value;
      Vec k[NV][4];
      for (int q = 0; q < NV; ++q) {
        for (int t = 0; t < 4; ++t) k[q][t] = LoadVec(coef[t], j0 + q * kWidth);
      }
      for (int64_t i = i0; i < i1; ++i) {
        const typename T::Storage* ar = a + i * c + j0;
        const typename T::Storage* br = b + i * c + j0;
        typename T::Storage* outr = out + i * c + j0;
        for (int q = 0; q < NV; ++q) {
          const Vec r = fn(LoadVec(ar, q * kWidth), LoadVec(br, q * kWidth), k[q]);
          if (stream) {
            StreamVec(outr, q * kWidth, r);
          } else {
            StoreVec(outr, q * kWidth, r);
          }
        }
      }
    });
    for (int64_t j = tail; j < width; ++j) {
      const float k[4] = {coef[0][j], coef[1][j], coef[2][j], coef[3][j]};
      for (int64_t i = i0; i < i1; ++i) T::Store(out + i * c, j, fn(T::Load(a + i * c, j), T::Load(b + i * c, j), k));
    }
  }
  if (stream) StreamFence();
}

// Whether SlabMap may stream into out (channel block start) with row stride c.
template <typename S>
inline bool CanStreamSlab(const S* out, int64_t c, int64_t out_bytes) {
  return kCanStream && out_bytes >= kStreamBytes && c % kWidth == 0 &&
         reinterpret_cast<uintptr_t>(out) % (kWidth * sizeof(S)) == 0;
}

}  // namespace lucid

#endif  // LUCID_CSRC_MAPS_H_
