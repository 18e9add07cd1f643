// The AVX-512 build of the CPU row kernels (same scheme as flood_ce_avx2.cpp; the target features are
// those torch requires for its own AVX512 capability: F, BW, VL, DQ and FMA).
#include "flood_ce_isa_prelude.h"

#if defined(__GNUC__) && !defined(__clang__) && (defined(__x86_64__) || defined(_M_X64))

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c,avx2")
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
#ifndef __AVX512F__
#define __AVX512F__ 1
#endif
#ifndef __AVX512BW__
#define __AVX512BW__ 1
#endif
#ifndef __AVX512VL__
#define __AVX512VL__ 1
#endif
#ifndef __AVX512DQ__
#define __AVX512DQ__ 1
#endif
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#define FLOOD_ISA_NS cpu_AVX512
#include "flood_ce_kernel.h"
#pragma GCC pop_options

#else

namespace flood_kernels::cpu_AVX512 {
CpuKernels kernels() { return {}; }
}  // namespace flood_kernels::cpu_AVX512

#endif
