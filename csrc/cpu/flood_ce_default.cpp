// The portable build of the CPU row kernels (at::vec's generic Vectorized, compiled with the build's
// default flags). Used on CPUs without AVX2 and on non-x86 platforms.
#include "flood_ce_isa_prelude.h"

#define CPU_CAPABILITY DEFAULT
#define CPU_CAPABILITY_DEFAULT
#define FLOOD_ISA_NS cpu_DEFAULT
#include "flood_ce_kernel.h"
