// Numbers in TORCH_CHECK messages, as strings. A message never streams an integer, a double or an IntArrayRef into
// c10::str: on the GPU machine the number formatting of std::ostream instantiated in this extension crashed
// (SIGSEGV in num_put through a libstdc++ facet of another build, seen with cuda-gdb), while strings, dtypes and
// devices stream safely. std::to_string formats without any stream.
#pragma once

#include <c10/util/ArrayRef.h>

#include <cstdint>
#include <string>

namespace vibeperf {

inline std::string num(int64_t v) { return std::to_string(v); }

inline std::string num(double v) { return std::to_string(v); }

inline std::string shape(c10::IntArrayRef sizes) {
  std::string out = "[";
  for (size_t i = 0; i < sizes.size(); ++i) out += (i ? ", " : "") + std::to_string(sizes[i]);
  return out + "]";
}

}  // namespace vibeperf
