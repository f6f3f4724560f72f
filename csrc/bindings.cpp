#include <torch/extension.h>

#include "packing.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("pack_best_fit_decreasing", &pack_best_fit_decreasing, "Best-fit-decreasing packing of lengths into bins");
#ifdef VIBEPERF_WITH_CUDA
  m.attr("WITH_CUDA") = true;
#else
  m.attr("WITH_CUDA") = false;
#endif
}
