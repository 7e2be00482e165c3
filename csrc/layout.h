// The shape of a call and how its instances are cut into units of work:
// groups of short rows (channels-first) and channel blocks of slabs
// (channels-last), the latter spread over threads.

#ifndef LUCID_CSRC_LAYOUT_H_
#define LUCID_CSRC_LAYOUT_H_

#include <algorithm>
#include <cstdint>

#include "simd.h"
#include "threading.h"

namespace lucid {

// channels_last = false takes x as (P, N, C, M) flattened to rows of M
// contiguous elements; channels_last = true takes (P, N, M, C). P is a
// leading batch (from jax.vmap) over which weight and bias may differ: they
// have P*C elements. Statistics are (P, N, C).
struct Shape {
  int64_t p = 1;  // leading (vmap) batch: weight and bias differ along it
  int64_t n = 1;
  int64_t c = 1;
  int64_t m = 1;  // spatial size of one instance
  bool channels_last = false;

  int64_t instances() const { return p * n * c; }
};

// ------------------------------------------------------ channels-first --

// Channels-first work goes row by row, a few short rows at a time: the sums
// of a group first, then the per-row coefficients (square roots and
// divisions of different rows overlap instead of each row waiting on its
// own), then the outputs, while the group is still in cache.
constexpr int64_t kGroup = 16;
constexpr int64_t kGroupBytes = int64_t{1} << 16;

inline int64_t RowGroup(int64_t row_bytes) {
  return std::clamp<int64_t>(kGroupBytes / std::max<int64_t>(row_bytes, 1), 1, kGroup);
}

// The indices into weight (P*C) of rows [r0, r0 + rows) of the (P*N*C, M)
// view (two divisions per group rather than per row).
inline void ParamIndices(const Shape& s, int64_t r0, int64_t rows, int64_t* pc) {
  int64_t c = r0 % s.c, q = r0 / s.c, n = q % s.n, p = q / s.n;
  for (int64_t j = 0; j < rows; ++j) {
    pc[j] = p * s.c + c;
    if (++c == s.c) {
      c = 0;
      if (++n == s.n) {
        n = 0;
        ++p;
      }
    }
  }
}

// ------------------------------------------------------- channels-last --

// Channel blocks per slab for channels-last work: enough units to keep
// `threads` threads busy, each block a whole number of cache lines wide where possible.
// (Narrower blocks that would keep a block in cache between the two passes
// measured slower: strided reads over a slab cost more than re-reading it.)
inline int64_t ChannelBlocks(const Shape& s, int64_t threads) {
  const int64_t slabs = s.p * s.n;
  int64_t blocks = (2 * threads + slabs - 1) / slabs;
  return std::max<int64_t>(1, std::min<int64_t>(blocks, s.c / 16));
}

// The first channel of block blk of `blocks` over c channels: a multiple of
// kWidth (whole vectors, aligned stores) except at the end. ChannelBlocks
// leaves every block at least 16 channels wide, so none ends up empty.
inline int64_t BlockStart(int64_t c, int64_t blk, int64_t blocks) {
  return blk == blocks ? c : c * blk / blocks / kWidth * kWidth;
}

// One unit of channels-last work: channels [c0, c1) of one (N) slab of M rows
// of C channels; p is the slab's leading (vmap) index, which picks its
// weights.
struct ChannelBlock {
  int64_t slab, p, c0, c1;

  // Offsets, from the start of a call's buffers, of the block's first element
  // (x and the outputs shaped like it), of its first statistic, and of its
  // first weight.
  int64_t data(const Shape& s) const { return slab * s.m * s.c + c0; }
  int64_t stat(const Shape& s) const { return slab * s.c + c0; }
  int64_t param(const Shape& s) const { return p * s.c + c0; }
};

// Runs body(block) for every channel block of every slab, the blocks split
// across threads (`bytes` as in ParallelFor).
template <typename Body>
void ForEachChannelBlock(const Workers& workers, const Shape& s, int64_t bytes, Body body) {
  const int64_t blocks = ChannelBlocks(s, workers.threads());
  ParallelFor(workers, s.p * s.n * blocks, bytes, [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) {
      const int64_t slab = u / blocks, blk = u % blocks;
      body(ChannelBlock{slab, slab / s.n, BlockStart(s.c, blk, blocks), BlockStart(s.c, blk + 1, blocks)});
    }
  });
}

}  // namespace lucid

#endif  // LUCID_CSRC_LAYOUT_H_
