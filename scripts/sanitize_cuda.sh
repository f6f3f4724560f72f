#!/usr/bin/env bash
# compute-sanitizer over the CUDA LM-head path (vibeperf._C: row kernel + cuBLASLt GEMMs) on small odd cases: every
# dtype, V not a multiple of the vector width (1009, 131: padded rows, scalar tails), a bias, ignored rows, entropy,
# chunks of 13 rows and of 1, the no-grad forward, the fused NLL, the recompute backward and the MGPO loss (TIS, KL,
# with and without gradients). Run on the GPU machine after building the extension:
#   bash scripts/sanitize_cuda.sh [memcheck|racecheck|initcheck|synccheck]      (default memcheck)
# Exits non-zero when the sanitizer reports an error or the script fails.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
tool="${1:-memcheck}"
PY="${VIBEPERF_PYTHON:-python3}"
script="$(mktemp /tmp/vibeperf_sanitize_XXXX.py)"
trap 'rm -f "$script"' EXIT
cat >"$script" <<'PY'
import torch
from vibeperf import _ext
from vibeperf.kernels import linear_cross_entropy, linear_logprob, mgpo_loss
from vibeperf.kernels.lmhead import cuda_backend, triton_rows

assert _ext.HAS_CUDA_EXT, f"vibeperf._C has no CUDA part ({_ext.EXT_ERROR})"
g = torch.Generator(device="cuda").manual_seed(0)
cases = [(37, 1009, 64, torch.bfloat16, False), (33, 131, 40, torch.float16, True), (29, 1009, 48, torch.float32, True),
         (16, 1024, 64, torch.bfloat16, True)]
for n, v, h, dtype, with_bias in cases:
    hidden = torch.randn(n, h, device="cuda", generator=g).to(dtype).requires_grad_(True)
    weight = (0.3 * torch.randn(v, h, device="cuda", generator=g)).to(dtype).requires_grad_(True)
    bias = torch.randn(v, device="cuda", generator=g).to(dtype).requires_grad_(True) if with_bias else None
    targets = torch.randint(0, v, (n,), device="cuda", generator=g)
    targets[::5] = -100
    with torch.no_grad():
        linear_logprob(hidden, weight, targets, bias=bias, return_entropy=True, backend="cuda")
    linear_cross_entropy(hidden, weight, targets, bias=bias, temperature=0.7, backend="cuda").backward()
    logp, ent = linear_logprob(hidden, weight, targets, bias=bias, return_entropy=True, backend="cuda")
    (logp.sum() + ent.sum()).backward()
    for chunk in (13, 1):
        cuda_backend.lmhead_chunked(hidden.detach(), weight.detach(), targets, None if bias is None else bias.detach(),
                                    temperature=1.0, ignore_index=-100, loss=triton_rows.LOSS_NLL,
                                    g_logp=torch.ones(n, device="cuda"), want_entropy=True, chunk=chunk)
    # MGPO closed form in the row kernel: TIS, KL, ignored rows; with gradients and without
    seq = torch.arange(n, device="cuda") * 4 // n
    old = torch.randn(n, device="cuda", generator=g) - 5
    kw = dict(seq_index=seq, group_index=torch.tensor([0, 0, 1, 1], device="cuda"),
              rewards=torch.tensor([1.0, 0.0, 1.0, 1.0], device="cuda"), old_logp=old, rollout_logp=old + 0.1,
              ref_logp=old - 0.2, beta=0.05, bias=bias, backend="cuda")
    mgpo_loss(hidden, weight, targets, **kw).loss.backward()
    with torch.no_grad():
        mgpo_loss(hidden, weight, targets, **kw)
torch.cuda.synchronize()
print("sanitize cases ran:", len(cases))
PY
compute-sanitizer --tool "$tool" --error-exitcode 1 "$PY" "$script"
