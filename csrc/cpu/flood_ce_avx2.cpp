// The AVX2 + FMA build of the CPU row kernels. torch compiles its own kernels once per ISA with per-file
// flags; setuptools cannot set per-file flags, so this TU switches GCC's code generation target with a
// pragma after all ISA-independent headers are included (flood_ce_isa_prelude.h) and defines the macros
// at::vec reads. Chosen at run time only when torch reports AVX2 (or better) for this CPU.
#include "flood_ce_isa_prelude.h"

#if defined(__GNUC__) && !defined(__clang__) && (defined(__x86_64__) || defined(_M_X64))

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
// GCC's C++ front end does not update the ISA macros on `#pragma GCC target`; sleef.h and at::vec read them.
#ifndef __AVX__
#define __AVX__ 1
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#endif
#ifndef __FMA__
#define __FMA__ 1
#endif
#ifndef __F16C__
#define __F16C__ 1
#endif
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#define FLOOD_ISA_NS cpu_AVX2
#include "flood_ce_kernel.h"
#pragma GCC pop_options

#else

namespace flood_kernels::cpu_AVX2 {
CpuKernels kernels() { return {}; }
}  // namespace flood_kernels::cpu_AVX2

#endif
