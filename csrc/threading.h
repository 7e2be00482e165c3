// How lucid's kernels split their work across threads they do not own.

#ifndef LUCID_CSRC_THREADING_H_
#define LUCID_CSRC_THREADING_H_

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <thread>

#if defined(__linux__)
#include <sched.h>
#endif

namespace lucid {

// The CPUs this process may run on, at least 1: its affinity mask where the
// system has one (taskset, cpusets and container runtimes narrow it; the
// machine's core count would over-split the work), else the hardware threads.
// Read once: the pool's threads keep the mask they started with.
inline int64_t AvailableCpus() {
  static const int64_t cpus = [] {
#if defined(__linux__)
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max<int64_t>(1, CPU_COUNT(&set));
#endif
    return std::max<int64_t>(1, std::thread::hardware_concurrency());
  }();
  return cpus;
}

// Helper threads for ParallelFor: `schedule` runs a task on another thread
// (in the FFI handlers, XLA's intra-op pool, so lucid starts no threads of its
// own and shares the cores with the rest of the program), `helpers` says how
// many may run at once.
struct Workers {
  int64_t helpers = 0;
  std::function<void(std::function<void()>)> schedule;

  // The threads worth splitting work over: the caller and its helpers, no
  // more than there are CPUs to run them.
  int64_t threads() const { return std::min<int64_t>(1 + helpers, AvailableCpus()); }
};

// Runs body(begin, end) over [0, units) in contiguous chunks, claimed from a
// shared counter by the calling thread and by up to `helpers` tasks. The
// caller claims chunks too, so the work completes even when no task ever
// starts (a busy pool, or one that runs tasks inline; without a pool,
// helpers is 0 and the work runs on the calling thread alone), and it
// returns once every claimed chunk is done: a task that starts later finds
// no chunk left and touches only the counters, which it co-owns. Small
// problems (`bytes` of memory traffic) stay on the calling thread.
template <typename Body>
void ParallelFor(const Workers& workers, int64_t units, int64_t bytes, Body body) {
  constexpr int64_t kMinBytesPerChunk = int64_t{1} << 18;
  const int64_t threads = std::min<int64_t>(workers.threads(), units);
  // One chunk per thread (measured: finer chunks slowed the backward).
  const int64_t chunks = std::min<int64_t>(threads, bytes / kMinBytesPerChunk);
  if (threads <= 1 || chunks <= 1 || !workers.schedule) {
    body(int64_t{0}, units);
    return;
  }
  struct Counters {
    std::atomic<int64_t> next{0}, active{0};
  };
  auto counters = std::make_shared<Counters>();
  const int64_t chunk = (units + chunks - 1) / chunks;
  auto drain = [counters, units, chunk, b = &body] {
    counters->active.fetch_add(1);
    for (int64_t u; (u = counters->next.fetch_add(chunk)) < units;) (*b)(u, std::min(u + chunk, units));
    counters->active.fetch_sub(1);
  };
  for (int64_t t = 1; t < chunks; ++t) workers.schedule(drain);
  drain();
  // Sequentially consistent counters (the defaults) are what make this exact:
  // a task's increment of `active` precedes its successful claim, which
  // precedes the caller's final failed claim and so this load.
  while (counters->active.load() != 0) std::this_thread::yield();
}

}  // namespace lucid

#endif  // LUCID_CSRC_THREADING_H_
