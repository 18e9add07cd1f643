// Included first by each per-ISA translation unit (flood_ce_{default,avx2,avx512}.cpp): every header that
// is not instruction-set specific is pulled in here, *before* the TU switches the code generation target,
// so that only at::vec (in its own CPU_CAPABILITY namespace) and our kernels are compiled for the ISA.
#pragma once

#include "../flood_ce.h"

#include <c10/core/ScalarType.h>
#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <c10/util/complex.h>
#include <c10/util/irange.h>
#include <c10/util/Exception.h>
#include <c10/util/TypeCast.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <iostream>
#include <limits>
#include <memory>
#include <ostream>
#include <sstream>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>
