// LM-head kernels: the row epilogue (log-sum-exp, log-prob, entropy, dL/dz in place) and the cuBLASLt GEMMs of the
// chunked three-pass engine (see kernels/lmhead/chunked.py for the schedule; this is its CUDA twin).
#include <cublasLt.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <map>
#include <mutex>
#include <stdexcept>
#include <string>
#include <tuple>

#include "lmhead.cuh"

namespace vibeperf::lmhead {
namespace {

constexpr float kLn2 = 0.6931471805599453f;
constexpr int kRowThreads = 512;
constexpr int kRowWarps = kRowThreads / 32;
constexpr int kUnroll = 4;

void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("vibeperf lmhead: ") + what + ": " + cudaGetErrorString(err));
  }
}

void check_blas(cublasStatus_t status, const char* what) {
  if (status != CUBLAS_STATUS_SUCCESS) {
    throw std::runtime_error(std::string("vibeperf lmhead: ") + what + " failed with cublasStatus_t " +
                             std::to_string(static_cast<int>(status)));
  }
}

template <typename T>
struct Elem;
template <>
struct Elem<float> {
  __device__ static float load(float x) { return x; }
  __device__ static float store(float x) { return x; }
};
template <>
struct Elem<__half> {
  __device__ static float load(__half x) { return __half2float(x); }
  __device__ static __half store(float x) { return __float2half_rn(x); }
};
template <>
struct Elem<__nv_bfloat16> {
  __device__ static float load(__nv_bfloat16 x) { return __bfloat162float(x); }
  __device__ static __nv_bfloat16 store(float x) { return __float2bfloat16_rn(x); }
};

// Online softmax state in base 2: m the running max (from -inf), s = sum 2^(x - m), t = sum 2^(x - m) (x - m).
// t is kept relative to the running max, so the entropy log2(s) - t / s carries no cancellation when the logits are
// large (as triton_fwd.online_softmax_rows).
struct SoftmaxState {
  float m, s, t;
};

// The state's t moved to a new (larger or equal) max m_new and scaled by 2^(m - m_new); 0 while the state is empty.
__device__ __forceinline__ float rebase_t(const SoftmaxState& st, float m_new, float scale) {
  return st.s > 0.f ? scale * fmaf(st.s, st.m - m_new, st.t) : 0.f;
}

__device__ __forceinline__ SoftmaxState combine(SoftmaxState a, SoftmaxState b) {
  const float m = fmaxf(a.m, b.m);
  if (m == -INFINITY) return {m, 0.f, 0.f};
  const float ea = exp2f(a.m - m);
  const float eb = exp2f(b.m - m);
  return {m, a.s * ea + b.s * eb, rebase_t(a, m, ea) + rebase_t(b, m, eb)};
}

__device__ __forceinline__ SoftmaxState warp_combine(SoftmaxState st) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    SoftmaxState o{__shfl_xor_sync(0xffffffffu, st.m, off), __shfl_xor_sync(0xffffffffu, st.s, off),
                   __shfl_xor_sync(0xffffffffu, st.t, off)};
    st = combine(st, o);
  }
  return st;
}

// Folds n base-2 logits x[] into the state: one rescale per vector, then one exp2 per element.
template <int N>
__device__ __forceinline__ void fold(SoftmaxState& st, const float (&x)[N], bool want_t) {
  float vmax = x[0];
#pragma unroll
  for (int j = 1; j < N; ++j) vmax = fmaxf(vmax, x[j]);
  const float m_new = fmaxf(st.m, vmax);
  if (m_new == -INFINITY) return;
  const float alpha = exp2f(st.m - m_new);
  float s = 0.f, t = 0.f;
#pragma unroll
  for (int j = 0; j < N; ++j) {
    const float xc = x[j] - m_new;
    const float p = exp2f(xc);
    s += p;
    if (want_t) t = fmaf(p, p > 0.f ? xc : 0.f, t);  // a -inf logit (from the bias) adds nothing, not NaN
  }
  if (want_t) st.t = rebase_t(st, m_new, alpha) + t;
  st.s = fmaf(st.s, alpha, s);
  st.m = m_new;
}

template <typename T>
__device__ __forceinline__ void unpack(const uint4& raw, const float* bias, int64_t col, float scale,
                                       float (&x)[16 / sizeof(T)]) {
  constexpr int kVec = 16 / sizeof(T);
  const T* v = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int j = 0; j < kVec; ++j) {
    float z = Elem<T>::load(v[j]);
    if (bias != nullptr) z += __ldg(bias + col + j);
    x[j] = z * scale;
  }
}

// MGPO terms of one token (the PPO-clip subset of kernels/policy/token_loss.py): writes the row's kMgpoOutputs
// terms and returns d objective / d logp. objective = min(ratio A', clip(ratio) A') * is_w - beta * kl, ratio =
// exp(logp - old_logp), is_w = min(exp(old_logp - rollout_logp), tis_cap) (a constant), kl = exp(ref - logp) -
// (ref - logp) - 1. The clipped side of the min is the smaller one exactly when a clip flag is set; it is flat in logp.
__device__ __forceinline__ float mgpo_token_grad(const MgpoTokens& m, int64_t row, float logp, bool valid) {
  float* out = m.out + row * kMgpoOutputs;
  if (!valid) {
#pragma unroll
    for (int k = 0; k < kMgpoOutputs; ++k) out[k] = 0.f;
    return 0.f;
  }
  const float adv = m.adv[row], old_logp = m.old_logp[row];
  const float ratio = expf(logp - old_logp);
  const bool low = ratio < m.clip_low && adv < 0.f;
  const bool high = ratio > m.clip_high && adv > 0.f;
  float objective = fminf(ratio * adv, fminf(fmaxf(ratio, m.clip_low), m.clip_high) * adv);
  float d_objective = (low || high) ? 0.f : ratio * adv;
  bool capped = false;
  if (m.rollout_logp != nullptr) {
    const float is_raw = expf(old_logp - m.rollout_logp[row]);
    const float is_w = fminf(is_raw, m.tis_cap);
    objective *= is_w;
    d_objective *= is_w;
    capped = is_raw > m.tis_cap;
  }
  float kl = 0.f;
  if (m.ref_logp != nullptr) {
    const float delta = m.ref_logp[row] - logp;
    const float e = expf(delta);
    kl = e - delta - 1.f;
    objective -= m.beta * kl;
    d_objective -= m.beta * (1.f - e);
  }
  out[0] = objective;
  out[1] = ratio;
  out[2] = kl;
  out[3] = low ? 1.f : 0.f;
  out[4] = high ? 1.f : 0.f;
  out[5] = capped ? 1.f : 0.f;
  return d_objective;
}

// The per-token gradient coefficient g = dLoss/dlogp, formed once per row right after the log-sum-exp.
__device__ __forceinline__ float token_grad_coefficient(const TokenGrad& grad, int64_t row, float logp, bool valid) {
  switch (grad.loss) {
    case kLossMgpo: {
      const float d_objective = mgpo_token_grad(grad.mgpo, row, logp, valid);  // writes the terms, ignored rows too
      return valid ? -grad.g_logp[row] * d_objective : 0.f;
    }
    case kLossNll:
      return valid ? -grad.g_logp[row] : 0.f;
    default:
      return valid ? grad.g_logp[row] : 0.f;
  }
}

template <typename T>
__global__ void __launch_bounds__(kRowThreads) lmhead_row_grad_kernel(RowArgs args) {
  constexpr int kVec = 16 / sizeof(T);
  const int64_t row = blockIdx.x;
  const int tid = threadIdx.x;
  T* zrow = static_cast<T*>(args.z) + row * args.row_stride;
  const int64_t vocab = args.vocab;
  const float* bias = args.bias;
  const float scale = args.scale_log2;
  const bool want_t = args.entropy != nullptr || args.grad.g_ent != nullptr;
  // rows start 16-byte aligned (checked by the launcher): 16-byte vectors, then a scalar tail of < kVec elements
  const int64_t nvec = vocab / kVec;
  const int64_t tail = nvec * kVec;
  const uint4* body = reinterpret_cast<const uint4*>(zrow);

  SoftmaxState st{-INFINITY, 0.f, 0.f};
  int64_t i = tid;
  for (; i + (kUnroll - 1) * kRowThreads < nvec; i += kUnroll * kRowThreads) {
    uint4 raw[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) raw[u] = __ldcg(body + i + u * kRowThreads);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      float x[kVec];
      unpack<T>(raw[u], bias, (i + u * kRowThreads) * kVec, scale, x);
      fold(st, x, want_t);
    }
  }
  for (; i < nvec; i += kRowThreads) {
    float x[kVec];
    unpack<T>(__ldcg(body + i), bias, i * kVec, scale, x);
    fold(st, x, want_t);
  }
  for (int64_t col = tail + tid; col < vocab; col += kRowThreads) {
    float x[1] = {(Elem<T>::load(zrow[col]) + (bias != nullptr ? bias[col] : 0.f)) * scale};
    fold(st, x, want_t);
  }

  const int64_t tgt = args.targets[row];
  const bool valid = tgt != args.ignore_index;
  const bool in_range = tgt >= 0 && tgt < vocab;
  float zt = 0.f;
  if (tid == 0 && valid && in_range) zt = (Elem<T>::load(zrow[tgt]) + (bias != nullptr ? bias[tgt] : 0.f)) * scale;

  __shared__ SoftmaxState warp_states[kRowWarps];
  __shared__ float row_consts[5];
  st = warp_combine(st);
  if ((tid & 31) == 0) warp_states[tid >> 5] = st;
  __syncthreads();
  if (tid < 32) {
    st = tid < kRowWarps ? warp_states[tid] : SoftmaxState{-INFINITY, 0.f, 0.f};
    st = warp_combine(st);
    if (tid == 0) {
      const float lse2 = st.m + log2f(st.s);
      const float mean_zc = st.t / st.s;  // E_p[x] - m, base 2
      // an out-of-range target (neither a vocabulary id nor ignore_index) gives NaN rather than a stray read
      const float logp = !valid ? 0.f : (in_range ? (zt - lse2) * kLn2 : NAN);
      args.logp[row] = logp;
      args.lse[row] = lse2 * kLn2;
      if (args.entropy != nullptr) args.entropy[row] = valid ? (log2f(st.s) - mean_zc) * kLn2 : 0.f;
      // MGPO writes its per-token terms here, also without gradients; the scoring forward has no g_logp to read
      const bool want_g = args.write_grad || args.grad.loss == kLossMgpo;
      const float g = want_g ? token_grad_coefficient(args.grad, row, logp, valid) : 0.f;
      if (args.write_grad) {
        row_consts[0] = lse2;
        row_consts[1] = st.m;
        row_consts[2] = g;
        row_consts[3] = (valid && args.grad.g_ent != nullptr) ? args.grad.g_ent[row] * kLn2 : 0.f;
        row_consts[4] = mean_zc;
      }
    }
  }
  if (!args.write_grad) return;
  __syncthreads();

  // dL/dz = (g (onehot(y) - p) + g_H p (E_p[z] - z)) / temperature, z the tempered logits (here in base 2, so the
  // entropy term carries ln 2; E_p[z] - z = mean_zc - (x - m), both relative to the row max m).
  const float lse2 = row_consts[0], m = row_consts[1], g = row_consts[2], g_ent = row_consts[3];
  const float mean_zc = row_consts[4];
  const float inv_temp = args.inv_temp;
  const int64_t hit = (valid && in_range) ? tgt : -1;
  auto grad_of = [&](float x, int64_t col) {
    const float p = exp2f(x - lse2);
    float d = -g * p;
    if (g_ent != 0.f) d = fmaf(g_ent * p, mean_zc - (x - m), d);
    if (col == hit) d += g;
    return d * inv_temp;
  };
  uint4* wbody = reinterpret_cast<uint4*>(zrow);
  i = tid;
  for (; i + (kUnroll - 1) * kRowThreads < nvec; i += kUnroll * kRowThreads) {
    uint4 raw[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) raw[u] = __ldcg(wbody + i + u * kRowThreads);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t col0 = (i + u * kRowThreads) * kVec;
      float x[kVec];
      unpack<T>(raw[u], bias, col0, scale, x);
      uint4 out;
      T* o = reinterpret_cast<T*>(&out);
#pragma unroll
      for (int j = 0; j < kVec; ++j) o[j] = Elem<T>::store(grad_of(x[j], col0 + j));
      wbody[i + u * kRowThreads] = out;
    }
  }
  for (; i < nvec; i += kRowThreads) {
    const int64_t col0 = i * kVec;
    float x[kVec];
    unpack<T>(__ldcg(wbody + i), bias, col0, scale, x);
    uint4 out;
    T* o = reinterpret_cast<T*>(&out);
#pragma unroll
    for (int j = 0; j < kVec; ++j) o[j] = Elem<T>::store(grad_of(x[j], col0 + j));
    wbody[i] = out;
  }
  for (int64_t col = tail + tid; col < vocab; col += kRowThreads) {
    const float x = (Elem<T>::load(zrow[col]) + (bias != nullptr ? bias[col] : 0.f)) * scale;
    zrow[col] = Elem<T>::store(grad_of(x, col));
  }
}

cudaDataType_t blas_type(Dtype dtype) {
  switch (dtype) {
    case Dtype::kFloat32:
      return CUDA_R_32F;
    case Dtype::kFloat16:
      return CUDA_R_16F;
    case Dtype::kBFloat16:
      return CUDA_R_16BF;
  }
  throw std::runtime_error("vibeperf lmhead: unknown dtype");
}

int current_device() {
  int dev = 0;
  check_cuda(cudaGetDevice(&dev), "cudaGetDevice");
  return dev;
}

// One cuBLASLt handle per device, created on first use and kept for the life of the process.
cublasLtHandle_t blas_handle(int device) {
  static std::mutex mu;
  static std::map<int, cublasLtHandle_t> handles;
  std::lock_guard<std::mutex> lock(mu);
  auto it = handles.find(device);
  if (it != handles.end()) return it->second;
  cublasLtHandle_t handle = nullptr;
  check_blas(cublasLtCreate(&handle), "cublasLtCreate");
  handles.emplace(device, handle);
  return handle;
}

// The alignment (bytes, <= 256) a GEMM may assume for a matrix: of its pointer and of its leading dimension.
uint32_t alignment(const void* p, int64_t ld, cudaDataType_t type) {
  const auto addr = reinterpret_cast<uintptr_t>(p);
  const auto ld_bytes = static_cast<uint64_t>(ld) * (type == CUDA_R_32F ? 4u : 2u);
  uint32_t a = 256;
  while (a > 1 && ((addr % a) != 0 || (ld_bytes % a) != 0)) a >>= 1;
  return a;
}

// Column-major D[m, n] = op(A) op(B) + beta C (C = D). Row-major callers pass their matrices transposed.
struct GemmShape {
  int device;
  cudaDataType_t ab_type, d_type;
  cublasOperation_t transa, transb;
  int64_t m, n, k, lda, ldb, ldd;
  uint32_t align_a, align_b, align_d;
  size_t workspace_bytes;

  auto key() const {
    return std::make_tuple(device, static_cast<int>(ab_type), static_cast<int>(d_type), static_cast<int>(transa),
                           static_cast<int>(transb), m, n, k, lda, ldb, ldd, align_a, align_b, align_d,
                           workspace_bytes);
  }
};

struct GemmPlan {
  cublasLtMatmulDesc_t desc = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, d = nullptr;
  cublasLtMatmulAlgo_t algo{};
};

// Descriptors and the heuristic's algorithm, made once per shape (a chunked call sees at most two: the full chunk
// and the ragged last one) and kept for the life of the process.
const GemmPlan& gemm_plan(const GemmShape& s, cublasLtHandle_t handle) {
  using Key = decltype(s.key());
  static std::mutex mu;
  static auto* plans = new std::map<Key, GemmPlan>();
  std::lock_guard<std::mutex> lock(mu);
  const Key key = s.key();
  auto it = plans->find(key);
  if (it != plans->end()) return it->second;

  GemmPlan p;
  check_blas(cublasLtMatmulDescCreate(&p.desc, CUBLAS_COMPUTE_32F, CUDA_R_32F), "cublasLtMatmulDescCreate");
  check_blas(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_TRANSA, &s.transa, sizeof(s.transa)),
             "set TRANSA");
  check_blas(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_TRANSB, &s.transb, sizeof(s.transb)),
             "set TRANSB");
  const bool ta = s.transa == CUBLAS_OP_T, tb = s.transb == CUBLAS_OP_T;
  check_blas(cublasLtMatrixLayoutCreate(&p.a, s.ab_type, ta ? s.k : s.m, ta ? s.m : s.k, s.lda), "layout A");
  check_blas(cublasLtMatrixLayoutCreate(&p.b, s.ab_type, tb ? s.n : s.k, tb ? s.k : s.n, s.ldb), "layout B");
  check_blas(cublasLtMatrixLayoutCreate(&p.d, s.d_type, s.m, s.n, s.ldd), "layout D");

  cublasLtMatmulPreference_t pref = nullptr;
  check_blas(cublasLtMatmulPreferenceCreate(&pref), "cublasLtMatmulPreferenceCreate");
  const uint64_t ws = s.workspace_bytes;
  cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws));
  cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &s.align_a, sizeof(uint32_t));
  cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &s.align_b, sizeof(uint32_t));
  cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &s.align_d, sizeof(uint32_t));
  cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &s.align_d, sizeof(uint32_t));
  cublasLtMatmulHeuristicResult_t result{};
  int found = 0;
  const cublasStatus_t status =
      cublasLtMatmulAlgoGetHeuristic(handle, p.desc, p.a, p.b, p.d, p.d, pref, 1, &result, &found);
  cublasLtMatmulPreferenceDestroy(pref);
  if (status != CUBLAS_STATUS_SUCCESS || found == 0) {
    throw std::runtime_error("vibeperf lmhead: cuBLASLt has no algorithm for the GEMM m=" + std::to_string(s.m) +
                             " n=" + std::to_string(s.n) + " k=" + std::to_string(s.k) +
                             " (status " + std::to_string(static_cast<int>(status)) + ")");
  }
  p.algo = result.algo;
  return plans->emplace(key, p).first->second;
}

void matmul(GemmShape s, const void* a, const void* b, void* d, float beta, void* workspace, cudaStream_t stream) {
  if (s.m == 0 || s.n == 0) return;
  s.device = current_device();
  s.align_a = alignment(a, s.lda, s.ab_type);
  s.align_b = alignment(b, s.ldb, s.ab_type);
  s.align_d = alignment(d, s.ldd, s.d_type);
  cublasLtHandle_t handle = blas_handle(s.device);
  const GemmPlan& p = gemm_plan(s, handle);
  const float alpha = 1.f;
  check_blas(cublasLtMatmul(handle, p.desc, &alpha, a, p.a, b, p.b, &beta, d, p.d, d, p.d, &p.algo, workspace,
                            s.workspace_bytes, stream),
             "cublasLtMatmul");
}

}  // namespace

void row_grad(const RowArgs& args, Dtype dtype, cudaStream_t stream) {
  if (args.rows == 0) return;
  if (args.rows > 0x7fffffff) throw std::runtime_error("vibeperf lmhead: more than 2^31 - 1 rows in one chunk");
  const int64_t elem = dtype == Dtype::kFloat32 ? 4 : 2;
  if (reinterpret_cast<uintptr_t>(args.z) % 16 != 0 || (args.row_stride * elem) % 16 != 0 ||
      args.row_stride < args.vocab) {
    throw std::runtime_error("vibeperf lmhead: the logits rows must be 16-byte aligned (see padded_stride)");
  }
  const dim3 grid(static_cast<unsigned>(args.rows));
  switch (dtype) {
    case Dtype::kFloat32:
      lmhead_row_grad_kernel<float><<<grid, kRowThreads, 0, stream>>>(args);
      break;
    case Dtype::kFloat16:
      lmhead_row_grad_kernel<__half><<<grid, kRowThreads, 0, stream>>>(args);
      break;
    case Dtype::kBFloat16:
      lmhead_row_grad_kernel<__nv_bfloat16><<<grid, kRowThreads, 0, stream>>>(args);
      break;
  }
  check_cuda(cudaGetLastError(), "lmhead_row_grad_kernel launch");
}

void gemm_logits(Dtype dtype, const void* h, const void* w, void* z, int64_t ldz, int64_t rows, int64_t vocab,
                 int64_t hdim, void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  // z^T [V, C] (col-major, ld ldz) = W [V, H] h^T [H, C]: A = w as col-major [H, V] transposed, B = h as [H, C].
  const cudaDataType_t t = blas_type(dtype);
  matmul({0, t, t, CUBLAS_OP_T, CUBLAS_OP_N, vocab, rows, hdim, hdim, hdim, ldz, 0, 0, 0, workspace_bytes}, w, h, z,
         0.f, workspace, stream);
}

void gemm_dh(Dtype dtype, const void* dz, int64_t ldz, const void* w, void* dh, int64_t rows, int64_t vocab,
             int64_t hdim, void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  // dh^T [H, C] (ld H) = W^T [H, V] dz^T [V, C]: A = w as col-major [H, V], B = dz as col-major [V, C] (ld ldz).
  const cudaDataType_t t = blas_type(dtype);
  matmul({0, t, t, CUBLAS_OP_N, CUBLAS_OP_N, hdim, rows, vocab, hdim, ldz, hdim, 0, 0, 0, workspace_bytes}, w, dz, dh,
         0.f, workspace, stream);
}

void gemm_dw_accumulate(Dtype dtype, const void* dz, int64_t ldz, const void* h, float* dw, int64_t rows,
                        int64_t vocab, int64_t hdim, void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  // dW^T [H, V] (ld H, fp32) += h^T [H, C] dz [C, V]: A = h as col-major [H, C], B = dz as col-major [V, C]
  // (ld ldz) transposed.
  if (rows == 0) return;
  const cudaDataType_t t = blas_type(dtype);
  matmul({0, t, CUDA_R_32F, CUBLAS_OP_N, CUBLAS_OP_T, hdim, vocab, rows, hdim, ldz, hdim, 0, 0, 0, workspace_bytes},
         h, dz, dw, 1.f, workspace, stream);
}

}  // namespace vibeperf::lmhead
