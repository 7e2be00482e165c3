// Advice to the operating system about the kernels' output buffers.

#ifndef LUCID_CSRC_MEMORY_H_
#define LUCID_CSRC_MEMORY_H_

#include <cstdint>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace lucid {

// Output buffers come fresh from XLA's allocator, and on Linux a large one is
// often new address space whose first write faults in (and the kernel zeroes)
// one 4 KiB page at a time: for a 32 MiB output that costs more than the
// kernel's own work. Asking for transparent huge pages on the 2 MiB-aligned
// interior of the buffer makes those faults 512 times fewer. Advice only: a
// no-op where huge pages are off or the pages are already there.
inline void AdviseHugePages(void* data, int64_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{1} << 21;
  if (bytes < static_cast<int64_t>(4 * kHuge)) return;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(data) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(data) + static_cast<uintptr_t>(bytes)) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)data;
  (void)bytes;
#endif
}

}  // namespace lucid

#endif  // LUCID_CSRC_MEMORY_H_
