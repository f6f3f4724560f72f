#include <torch/extension.h>

#include "lmhead.h"
#include "packing.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("pack_best_fit_decreasing", &pack_best_fit_decreasing, "Best-fit-decreasing packing of lengths into bins");
#ifdef VIBEPERF_WITH_CUDA
  m.def("lmhead_chunked_cuda", &lmhead_chunked_cuda, "LM-head chunked forward + gradients (cuBLASLt + row kernel)");
  m.def("lmhead_mgpo_cuda", &lmhead_mgpo_cuda, "MGPO policy loss through the LM head (cuBLASLt + row kernel)");
  m.def("lmhead_logprob_fwd_cuda", &lmhead_logprob_fwd_cuda, "LM-head log-prob / entropy forward without grad");
  m.attr("WITH_CUDA") = true;
#else
  m.attr("WITH_CUDA") = false;
#endif
}
