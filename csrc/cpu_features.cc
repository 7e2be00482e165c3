// Which instruction-set extensions the running CPU supports, asked by lucid's
// loader (lucid/nn/_native.py) before it loads a kernel library compiled for
// them. Built into the baseline library only, which runs on any CPU of its
// architecture.
//
// __builtin_cpu_supports also checks that the operating system saves the
// vector state (AVX's YMM, AVX-512's ZMM and mask registers): a CPU with
// AVX-512 under a kernel that does not enable it reports no AVX-512 here.

#include <cstring>

extern "C" {
// 1 if the CPU supports `feature` (a GCC/Clang -m flag name without the -m,
// e.g. "avx2"), 0 if not, -1 if this build cannot tell.
__attribute__((visibility("default"))) int LucidCpuSupports(const char* feature);
}

int LucidCpuSupports(const char* feature) {
#if defined(__x86_64__) || defined(__i386__)
  // __builtin_cpu_supports takes literal names only: one entry per feature setup.py compiles for.
#define LUCID_FEATURE(name) \
  if (std::strcmp(feature, name) == 0) return __builtin_cpu_supports(name) ? 1 : 0;
  __builtin_cpu_init();
  LUCID_FEATURE("avx")
  LUCID_FEATURE("avx2")
  LUCID_FEATURE("fma")
  LUCID_FEATURE("f16c")
  LUCID_FEATURE("bmi")
  LUCID_FEATURE("bmi2")
  LUCID_FEATURE("avx512f")
  LUCID_FEATURE("avx512bw")
  LUCID_FEATURE("avx512cd")
  LUCID_FEATURE("avx512dq")
  LUCID_FEATURE("avx512vl")
  LUCID_FEATURE("avx512bf16")
#undef LUCID_FEATURE
#endif
  (void)feature;
  return -1;
}
