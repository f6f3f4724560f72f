// Torch-facing entry points of the CUDA LM-head path: input checks, allocation through torch's caching allocator,
// the current stream, and the chunk loop over the raw launchers of lmhead.cu.
#include "../checks.h"
#include "../lmhead.h"

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cmath>
#include <map>
#include <mutex>
#include <utility>

#include "lmhead.cuh"

namespace {

namespace lm = vibeperf::lmhead;

// cuBLASLt workspace, one per (device, stream) so that two streams never share one; kept for the process' life.
constexpr int64_t kBlasWorkspaceBytes = 32 << 20;

void* blas_workspace(const at::Device& device, cudaStream_t stream) {
  static std::mutex mu;
  static auto* buffers = new std::map<std::pair<int, cudaStream_t>, at::Tensor>();
  std::lock_guard<std::mutex> lock(mu);
  auto& buf = (*buffers)[{device.index(), stream}];
  if (!buf.defined()) buf = at::empty({kBlasWorkspaceBytes}, at::TensorOptions().device(device).dtype(at::kByte));
  return buf.data_ptr();
}

lm::Dtype to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return lm::Dtype::kFloat32;
    case at::kHalf:
      return lm::Dtype::kFloat16;
    case at::kBFloat16:
      return lm::Dtype::kBFloat16;
    default:
      TORCH_CHECK(false, "vibeperf lmhead (cuda): hidden and weight must be fp32, fp16 or bf16, got ", t);
  }
}

void check_vector(const at::Tensor& t, const char* name, int64_t n, const at::Tensor& like) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, "vibeperf lmhead (cuda): ", name, " must be [", vibeperf::num(n),
              "], got ", vibeperf::shape(t.sizes()));
  TORCH_CHECK(t.device() == like.device(), "vibeperf lmhead (cuda): ", name, " must be on ", like.device(),
              ", got ", t.device());
  TORCH_CHECK(t.is_contiguous(), "vibeperf lmhead (cuda): ", name, " must be contiguous");
}

void check_head(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets,
                const std::optional<at::Tensor>& bias, double temperature, int64_t chunk) {
  TORCH_CHECK(hidden.is_cuda(), "vibeperf lmhead (cuda): hidden must be a CUDA tensor, got ", hidden.device());
  TORCH_CHECK(hidden.dim() == 2, "vibeperf lmhead (cuda): hidden must be [N, H], got ",
              vibeperf::shape(hidden.sizes()));
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == hidden.size(1), "vibeperf lmhead (cuda): weight must be [V, H=",
              vibeperf::num(hidden.size(1)), "], got ", vibeperf::shape(weight.sizes()));
  TORCH_CHECK(weight.size(0) > 0 && hidden.size(1) > 0, "vibeperf lmhead (cuda): V and H must be positive");
  TORCH_CHECK(weight.device() == hidden.device(), "vibeperf lmhead (cuda): weight must be on ", hidden.device());
  TORCH_CHECK(weight.scalar_type() == hidden.scalar_type(),
              "vibeperf lmhead (cuda): hidden and weight must share a dtype, got ", hidden.scalar_type(), " and ",
              weight.scalar_type());
  to_dtype(hidden.scalar_type());
  TORCH_CHECK(hidden.is_contiguous() && weight.is_contiguous(),
              "vibeperf lmhead (cuda): hidden and weight must be contiguous");
  TORCH_CHECK(targets.scalar_type() == at::kLong, "vibeperf lmhead (cuda): targets must be int64, got ",
              targets.scalar_type());
  check_vector(targets, "targets", hidden.size(0), hidden);
  if (bias.has_value()) {
    TORCH_CHECK(at::isFloatingType(bias->scalar_type()), "vibeperf lmhead (cuda): bias must be floating point");
    check_vector(*bias, "bias", weight.size(0), hidden);
  }
  TORCH_CHECK(temperature > 0 && std::isfinite(temperature), "vibeperf lmhead (cuda): temperature must be > 0, got ",
              vibeperf::num(temperature));
  TORCH_CHECK(chunk >= 1, "vibeperf lmhead (cuda): chunk must be >= 1, got ", vibeperf::num(chunk));
}

struct Outputs {
  at::Tensor logp, lse, entropy, dh, dw, db;
};

// kLossMgpo's per-token tensors ([N] fp32; out [N, kMgpoOutputs] fp32, written) and constants.
struct MgpoInputs {
  at::Tensor adv, old_logp;
  std::optional<at::Tensor> rollout_logp, ref_logp;
  at::Tensor out;
  double clip_low, clip_high, tis_cap, beta;
};

const float* opt_ptr(const std::optional<at::Tensor>& t, int64_t offset) {
  return t.has_value() ? t->data_ptr<float>() + offset : nullptr;
}

Outputs run_chunks(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets,
                   const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& g_logp,
                   const std::optional<at::Tensor>& g_entropy, double temperature, int64_t ignore_index, int64_t loss,
                   bool want_entropy, bool need_dh, bool need_dw, int64_t chunk, const MgpoInputs* mgpo = nullptr) {
  const c10::cuda::CUDAGuard guard(hidden.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(hidden.device().index()).stream();
  const int64_t n = hidden.size(0), hdim = hidden.size(1), vocab = weight.size(0);
  const lm::Dtype dtype = to_dtype(hidden.scalar_type());
  const auto f32 = hidden.options().dtype(at::kFloat);
  const bool write_grad = need_dh || need_dw;

  Outputs out;
  out.logp = at::empty({n}, f32);
  out.lse = at::empty({n}, f32);
  out.entropy = at::empty({want_entropy ? n : 0}, f32);
  out.dh = need_dh ? at::empty_like(hidden) : at::empty({0}, hidden.options());
  // fp32 weights accumulate straight into the returned dW; lower precisions into an fp32 buffer cast at the end
  at::Tensor dw32 = need_dw ? at::zeros({vocab, hdim}, f32) : at::Tensor();
  at::Tensor db32 = (need_dw && bias.has_value()) ? at::zeros({vocab}, f32) : at::Tensor();
  at::Tensor bias32 = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();

  const int64_t c = std::min(chunk, std::max<int64_t>(n, 1));
  const int64_t ldz = lm::padded_stride(vocab, dtype);
  at::Tensor workspace = at::empty({n > 0 ? c : 0, ldz}, weight.options());
  void* blas_ws = n > 0 ? blas_workspace(hidden.device(), stream) : nullptr;
  const int64_t elem = hidden.element_size();
  const auto* h_ptr = static_cast<const char*>(hidden.data_ptr());
  const float* g_ptr = g_logp.has_value() ? g_logp->data_ptr<float>() : nullptr;
  const float* ge_ptr = g_entropy.has_value() ? g_entropy->data_ptr<float>() : nullptr;

  for (int64_t i0 = 0; i0 < n; i0 += c) {
    const int64_t rows = std::min(c, n - i0);
    const void* h_c = h_ptr + i0 * hdim * elem;
    lm::gemm_logits(dtype, h_c, weight.data_ptr(), workspace.data_ptr(), ldz, rows, vocab, hdim, blas_ws,
                    kBlasWorkspaceBytes, stream);
    lm::RowArgs args;
    args.z = workspace.data_ptr();
    args.bias = bias32.defined() ? bias32.data_ptr<float>() : nullptr;
    args.targets = targets.data_ptr<int64_t>() + i0;
    args.logp = out.logp.data_ptr<float>() + i0;
    args.lse = out.lse.data_ptr<float>() + i0;
    args.entropy = want_entropy ? out.entropy.data_ptr<float>() + i0 : nullptr;
    args.rows = rows;
    args.vocab = vocab;
    args.row_stride = ldz;
    args.ignore_index = ignore_index;
    args.scale_log2 = static_cast<float>(M_LOG2E / temperature);
    args.inv_temp = static_cast<float>(1.0 / temperature);
    args.write_grad = write_grad;
    args.grad.loss = static_cast<int>(loss);
    args.grad.g_logp = g_ptr != nullptr ? g_ptr + i0 : nullptr;
    args.grad.g_ent = ge_ptr != nullptr ? ge_ptr + i0 : nullptr;
    if (mgpo != nullptr) {
      args.grad.mgpo.adv = mgpo->adv.data_ptr<float>() + i0;
      args.grad.mgpo.old_logp = mgpo->old_logp.data_ptr<float>() + i0;
      args.grad.mgpo.rollout_logp = opt_ptr(mgpo->rollout_logp, i0);
      args.grad.mgpo.ref_logp = opt_ptr(mgpo->ref_logp, i0);
      args.grad.mgpo.out = mgpo->out.data_ptr<float>() + i0 * lm::kMgpoOutputs;
      args.grad.mgpo.clip_low = static_cast<float>(mgpo->clip_low);
      args.grad.mgpo.clip_high = static_cast<float>(mgpo->clip_high);
      args.grad.mgpo.tis_cap = static_cast<float>(mgpo->tis_cap);
      args.grad.mgpo.beta = static_cast<float>(mgpo->beta);
    }
    lm::row_grad(args, dtype, stream);
    if (need_dh) {
      void* dh_c = static_cast<char*>(out.dh.data_ptr()) + i0 * hdim * elem;
      lm::gemm_dh(dtype, workspace.data_ptr(), ldz, weight.data_ptr(), dh_c, rows, vocab, hdim, blas_ws,
                  kBlasWorkspaceBytes, stream);
    }
    if (need_dw) {
      lm::gemm_dw_accumulate(dtype, workspace.data_ptr(), ldz, h_c, dw32.data_ptr<float>(), rows, vocab, hdim,
                             blas_ws, kBlasWorkspaceBytes, stream);
      if (db32.defined()) db32.add_(at::sum(workspace.narrow(0, 0, rows).narrow(1, 0, vocab), {0}, false, at::kFloat));
    }
  }
  out.dw = need_dw ? (weight.scalar_type() == at::kFloat ? dw32 : dw32.to(weight.scalar_type()))
                   : at::empty({0}, hidden.options());
  out.db = db32.defined() ? db32.to(bias->scalar_type()) : at::empty({0}, hidden.options());
  return out;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lmhead_chunked_cuda(
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets,
    const std::optional<at::Tensor>& bias, const at::Tensor& g_logp, const std::optional<at::Tensor>& g_entropy,
    double temperature, int64_t ignore_index, int64_t loss, bool want_entropy, bool need_dh, bool need_dw,
    int64_t chunk) {
  check_head(hidden, weight, targets, bias, temperature, chunk);
  TORCH_CHECK(loss == lm::kLossGiven || loss == lm::kLossNll,
              "vibeperf lmhead (cuda): loss must be 0 (given upstream gradients) or 1 (weighted NLL), got ",
              vibeperf::num(loss));
  TORCH_CHECK(g_logp.scalar_type() == at::kFloat, "vibeperf lmhead (cuda): g_logp must be fp32");
  check_vector(g_logp, "g_logp", hidden.size(0), hidden);
  if (g_entropy.has_value()) {
    TORCH_CHECK(loss == lm::kLossGiven, "vibeperf lmhead (cuda): g_entropy is an upstream gradient (loss 0 only)");
    TORCH_CHECK(g_entropy->scalar_type() == at::kFloat, "vibeperf lmhead (cuda): g_entropy must be fp32");
    check_vector(*g_entropy, "g_entropy", hidden.size(0), hidden);
  }
  Outputs o = run_chunks(hidden, weight, targets, bias, g_logp, g_entropy, temperature, ignore_index, loss,
                         want_entropy, need_dh, need_dw, chunk);
  return {o.logp, o.lse, o.entropy, o.dh, o.dw, o.db};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lmhead_logprob_fwd_cuda(const at::Tensor& hidden,
                                                                      const at::Tensor& weight,
                                                                      const at::Tensor& targets,
                                                                      const std::optional<at::Tensor>& bias,
                                                                      double temperature, int64_t ignore_index,
                                                                      bool want_entropy, int64_t chunk) {
  check_head(hidden, weight, targets, bias, temperature, chunk);
  Outputs o = run_chunks(hidden, weight, targets, bias, std::nullopt, std::nullopt, temperature, ignore_index,
                         lm::kLossGiven, want_entropy, false, false, chunk);
  return {o.logp, o.lse, o.entropy};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lmhead_mgpo_cuda(
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets,
    const std::optional<at::Tensor>& bias, const at::Tensor& token_weight, const at::Tensor& adv,
    const at::Tensor& old_logp, const std::optional<at::Tensor>& rollout_logp,
    const std::optional<at::Tensor>& ref_logp, const at::Tensor& out, double clip_low, double clip_high,
    double tis_cap, double beta, double temperature, int64_t ignore_index, bool need_dh, bool need_dw,
    int64_t chunk) {
  check_head(hidden, weight, targets, bias, temperature, chunk);
  const int64_t n = hidden.size(0);
  auto check_f32 = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.scalar_type() == at::kFloat, "vibeperf lmhead (cuda): ", name, " must be fp32, got ",
                t.scalar_type());
    check_vector(t, name, n, hidden);
  };
  check_f32(token_weight, "token_weight");
  check_f32(adv, "adv");
  check_f32(old_logp, "old_logp");
  if (rollout_logp.has_value()) check_f32(*rollout_logp, "rollout_logp");
  if (ref_logp.has_value()) check_f32(*ref_logp, "ref_logp");
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.dim() == 2 && out.size(0) == n &&
                  out.size(1) == lm::kMgpoOutputs && out.is_contiguous() && out.device() == hidden.device(),
              "vibeperf lmhead (cuda): out must be a contiguous fp32 [", vibeperf::num(n), ", ",
              vibeperf::num(int64_t{lm::kMgpoOutputs}), "] tensor on ", hidden.device(), ", got ", out.scalar_type(),
              " ", vibeperf::shape(out.sizes()));
  const MgpoInputs mgpo{adv, old_logp, rollout_logp, ref_logp, out, clip_low, clip_high, tis_cap, beta};
  Outputs o = run_chunks(hidden, weight, targets, bias, token_weight, std::nullopt, temperature, ignore_index,
                         lm::kLossMgpo, true, need_dh, need_dw, chunk, &mgpo);
  return {o.logp, o.lse, o.entropy, o.dh, o.dw, o.db};
}
