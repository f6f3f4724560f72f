#pragma once
#include <torch/extension.h>

// Best-fit-decreasing bin packing of sequence lengths into bins of `budget` tokens.
// lengths: int64 [n], every value in [1, budget]. Returns int64 [n]: the bin of each sequence.
// Order: sequences by decreasing length (ties: lower index first); each goes to the open bin with the least
// remaining room that still fits it (ties: lower bin id), else to a new bin. Bin ids count up from 0 in opening order.
torch::Tensor pack_best_fit_decreasing(const torch::Tensor& lengths, int64_t budget);
