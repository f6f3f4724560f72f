// The CUDA LM-head path (backend="cuda" of vibeperf.kernels.linear_logprob), built only with VIBEPERF_WITH_CUDA.
// Kernels and cuBLASLt calls: csrc/cuda/lmhead.cu; these torch-facing entry points: csrc/cuda/lmhead_api.cpp.
#pragma once

#include <torch/extension.h>

#include <optional>
#include <tuple>

// Chunked three-pass engine (the twin of kernels/lmhead/chunked.py's lmhead_chunked).
// hidden [N, H], weight [V, H] (CUDA, contiguous, one of fp32 / fp16 / bf16, same dtype), targets [N] int64,
// bias [V] or None, g_logp [N] fp32 (loss 0: upstream dL/dlogp; loss 1: token weights of sum_t w_t * nll_t),
// g_entropy [N] fp32 or None (upstream dL/dentropy, loss 0 only). chunk: tokens per chunk, the [chunk, V] logits
// workspace in weight's dtype being the bound on extra memory besides the outputs.
// Returns (logp [N], lse [N], entropy [N] or [0], dh [N, H] or [0], dW [V, H] or [0], db [V] or [0]): fp32 log-probs,
// dh in hidden's dtype, dW / db in weight's / bias's dtype, accumulated in fp32.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lmhead_chunked_cuda(
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets,
    const std::optional<at::Tensor>& bias, const at::Tensor& g_logp, const std::optional<at::Tensor>& g_entropy,
    double temperature, int64_t ignore_index, int64_t loss, bool want_entropy, bool need_dh, bool need_dw,
    int64_t chunk);

// Scoring forward (no grad): per chunk the head GEMM and the row kernel only. Returns (logp [N], lse [N],
// entropy [N] or [0]), fp32.
std::tuple<at::Tensor, at::Tensor, at::Tensor> lmhead_logprob_fwd_cuda(const at::Tensor& hidden,
                                                                      const at::Tensor& weight,
                                                                      const at::Tensor& targets,
                                                                      const std::optional<at::Tensor>& bias,
                                                                      double temperature, int64_t ignore_index,
                                                                      bool want_entropy, int64_t chunk);

// MGPO clipped policy loss (the PPO-clip subset of kernels/policy/token_loss.py) in the row kernel:
// token_weight [N] (w_t of loss = -sum_t w_t objective_t), adv / old_logp [N] and rollout_logp / ref_logp [N] or None,
// all fp32; out [N, 6] fp32 receives the per-token terms (objective, ratio, kl, clipped low, clipped high, IS capped;
// 0 on ignored rows). Returns (logp, lse, entropy, dh or [0], dW or [0], db or [0]) as lmhead_chunked_cuda.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lmhead_mgpo_cuda(
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets,
    const std::optional<at::Tensor>& bias, const at::Tensor& token_weight, const at::Tensor& adv,
    const at::Tensor& old_logp, const std::optional<at::Tensor>& rollout_logp,
    const std::optional<at::Tensor>& ref_logp, const at::Tensor& out, double clip_low, double clip_high,
    double tis_cap, double beta, double temperature, int64_t ignore_index, bool need_dh, bool need_dw,
    int64_t chunk);
