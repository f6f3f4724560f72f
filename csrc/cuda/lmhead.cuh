// Raw-pointer launchers of the CUDA LM-head path (csrc/cuda/lmhead.cu): no torch types, so the .cu compiles with
// nvcc alone. The torch-facing wrapper (checks, allocation, the chunk loop) is csrc/cuda/lmhead_api.cpp.
// Every matrix is row-major and contiguous; errors are thrown as std::runtime_error.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace vibeperf::lmhead {

enum class Dtype : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// The per-token gradient coefficient g = dLoss/dlogp of the row kernel; the values match
// kernels/lmhead/triton_rows.LOSS_* and kernels/lmhead/cuda_backend.LOSS_MGPO.
enum Loss : int { kLossGiven = 0, kLossNll = 1, kLossMgpo = 2 };
constexpr int kMgpoOutputs = 6;  // cuda_backend.MGPO_OUTPUTS: objective, ratio, kl, clip_low, clip_high, tis_capped

// Per-token inputs of kLossMgpo (all [rows] fp32) and its [rows, kMgpoOutputs] fp32 output (0 on ignored rows).
struct MgpoTokens {
  const float* adv = nullptr;           // A' of the token's sequence
  const float* old_logp = nullptr;
  const float* rollout_logp = nullptr;  // or nullptr: no truncated importance sampling
  const float* ref_logp = nullptr;      // or nullptr: no KL term
  float* out = nullptr;
  float clip_low = 0.8f, clip_high = 1.2f, tis_cap = 2.f, beta = 0.f;
};

struct TokenGrad {
  int loss = kLossGiven;
  const float* g_logp = nullptr;  // [rows]: upstream dL/dlogp (kLossGiven) or the token weight w_t (kLossNll, Mgpo)
  const float* g_ent = nullptr;   // [rows] upstream dL/dentropy, or nullptr
  MgpoTokens mgpo;                // kLossMgpo only
};

struct RowArgs {
  void* z = nullptr;                  // [rows, vocab] (row stride row_stride) logits h W^T in; dL/d(h W^T) out
  const float* bias = nullptr;        // [vocab] fp32, or nullptr
  const int64_t* targets = nullptr;   // [rows]
  float* logp = nullptr;              // [rows] out
  float* lse = nullptr;               // [rows] out
  float* entropy = nullptr;           // [rows] out, or nullptr
  int64_t rows = 0;
  int64_t vocab = 0;
  int64_t row_stride = 0;             // elements; z and every row must be 16-byte aligned (see padded_stride)
  int64_t ignore_index = -100;
  float scale_log2 = 1.4426950408889634f;  // log2(e) / temperature
  float inv_temp = 1.0f;
  bool write_grad = false;
  TokenGrad grad;
};

// Row stride (elements) of the logits workspace: vocab rounded up to 16 bytes, so that every row is 16-byte aligned.
inline int64_t padded_stride(int64_t vocab, Dtype dtype) {
  const int64_t per16 = dtype == Dtype::kFloat32 ? 4 : 8;
  return (vocab + per16 - 1) / per16 * per16;
}

// One block per row: lse / logp / entropy, then (write_grad) dL/dz written over the row in place.
void row_grad(const RowArgs& args, Dtype dtype, cudaStream_t stream);

// The GEMMs of a chunk; z / dz is the [rows, vocab] logits workspace with row stride ldz (elements).
// z = h[rows, hdim] w[vocab, hdim]^T, in the input dtype.
void gemm_logits(Dtype dtype, const void* h, const void* w, void* z, int64_t ldz, int64_t rows, int64_t vocab,
                 int64_t hdim, void* workspace, size_t workspace_bytes, cudaStream_t stream);

// dh[rows, hdim] = dz w[vocab, hdim], dh in the input dtype.
void gemm_dh(Dtype dtype, const void* dz, int64_t ldz, const void* w, void* dh, int64_t rows, int64_t vocab,
             int64_t hdim, void* workspace, size_t workspace_bytes, cudaStream_t stream);

// dw[vocab, hdim] += dz^T h[rows, hdim], dw fp32, accumulated in place (beta = 1).
void gemm_dw_accumulate(Dtype dtype, const void* dz, int64_t ldz, const void* h, float* dw, int64_t rows,
                        int64_t vocab, int64_t hdim, void* workspace, size_t workspace_bytes, cudaStream_t stream);

}  // namespace vibeperf::lmhead
