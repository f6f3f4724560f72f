#include "packing.h"

#include "checks.h"

#include <algorithm>
#include <numeric>
#include <set>
#include <utility>
#include <vector>

torch::Tensor pack_best_fit_decreasing(const torch::Tensor& lengths, int64_t budget) {
  TORCH_CHECK(lengths.dim() == 1, "lengths must be 1-D, got ", vibeperf::num(lengths.dim()), " dims");
  TORCH_CHECK(lengths.scalar_type() == torch::kInt64, "lengths must be int64");
  TORCH_CHECK(lengths.device().is_cpu(), "lengths must be on the CPU");
  TORCH_CHECK(budget > 0, "budget must be positive, got ", vibeperf::num(budget));
  const auto len = lengths.contiguous();
  const int64_t* l = len.data_ptr<int64_t>();
  const int64_t n = len.numel();
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(l[i] >= 1 && l[i] <= budget, "lengths[", vibeperf::num(i), "] = ", vibeperf::num(l[i]),
                " is outside [1, budget=", vibeperf::num(budget), "]");
  }
  std::vector<int64_t> order(n);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [l](int64_t a, int64_t b) { return l[a] > l[b]; });

  auto bins = torch::empty({n}, torch::dtype(torch::kInt64));
  int64_t* out = bins.data_ptr<int64_t>();
  std::set<std::pair<int64_t, int64_t>> open;  // (remaining room, bin id)
  int64_t num_bins = 0;
  for (const int64_t i : order) {
    auto it = open.lower_bound({l[i], -1});
    if (it == open.end()) {
      out[i] = num_bins;
      if (budget - l[i] > 0) open.emplace(budget - l[i], num_bins);
      ++num_bins;
    } else {
      const auto [room, bin] = *it;
      open.erase(it);
      out[i] = bin;
      if (room - l[i] > 0) open.emplace(room - l[i], bin);
    }
  }
  return bins;
}
