"""torchrun + FSDP2 on the CPU (gloo, 2 processes, tiny model, fp32): one SFT optimizer step over a global batch
split across ranks equals the single-process step, the sharded (DCP) checkpoint of the 2-process run resumes in one
process, and `torchrun -m vibeperf sft` logs the single-process losses. The same file is the torchrun worker."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.distributed.tensor import DTensor

from vibeperf import distributed as vdist
from vibeperf.config import load_config
from vibeperf.data import Message, SFTRecord
from vibeperf.model import pack_rows, tokenize_records, use_varlen_attention
from vibeperf.sft import forward_backward, train
from vibeperf.sft.config import SFTConfig
from vibeperf.sft.synthetic import synthetic_records
from vibeperf.tiny_model import get_tiny_model
from vibeperf.train import clip_gradients

ROOT = Path(__file__).resolve().parents[1]
LR, CLIP = 1e-3, 0.5
SFT_ARGS = ["train.max_steps=2", "train.loss_backend=torch", "train.device=cpu", "logging.every=1",
            "logging.progress=false", "logging.plot=false", "checkpoint.save_final=false"]  # fmt: skip


def _rows(tokenizer):
    weights = [1.0, 0.5, 2.0, 1.0, 0.0, 1.5]
    records = [SFTRecord((Message("user", r["prompt"]), Message("assistant", r["response"])), w)
               for r, w in zip(synthetic_records(len(weights), task="arith", seed=0), weights)]  # fmt: skip
    samples = tokenize_records(records, tokenizer)
    return pack_rows(samples, 2 * max(s.length for s in samples))


def _setup(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    use_varlen_attention(model, "exact")
    model.train()
    return model, tokenizer


def _optimizer(model):
    return torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1, foreach=True)


def _worker(out: Path) -> None:
    device = vdist.init_distributed("cpu")
    assert device is not None and vdist.world_size() == 2
    model, tokenizer = _setup(get_tiny_model())
    rows = _rows(tokenizer)
    root = vdist.shard_model(model, vdist.default_mp_policy(device))
    assert all(isinstance(p, DTensor) for p in model.parameters())
    optimizer = _optimizer(model)
    mine = vdist.rank_rows(rows)
    n_local = torch.stack([(r.targets != -100).sum() * real for r, real in mine]).sum()
    n_loss = vdist.global_loss_tokens(n_local)
    inv = 1.0 / n_loss.clamp_min(1).to(torch.float32)
    total = torch.zeros(())
    for row, real in mine:
        loss = root(row.model_inputs(), row.targets, row.token_weight * inv * float(real), backend="torch")
        loss.backward()
        total += loss.detach()
    torch.distributed.all_reduce(total)
    gnorm = clip_gradients(model, CLIP)
    optimizer.step()
    vdist.save_sharded(out / "dcp", model, optimizer)
    vdist.export_full(model, out / "hf", tokenizer)
    if vdist.rank() == 0:
        torch.save({"loss": total, "gnorm": gnorm, "n_loss": n_loss, "rows": [len(mine), len(rows)]}, out / "m.pt")
    vdist.destroy_distributed()


def _reference(path):
    model, tokenizer = _setup(path)
    optimizer = _optimizer(model)
    loss, n_loss = forward_backward(model, _rows(tokenizer), loss_backend="torch")
    gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP, foreach=True)
    optimizer.step()
    return model, optimizer, loss, gnorm, n_loss


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    get_tiny_model()
    out = tmp_path_factory.mktemp("fsdp2")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", __file__, str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]
    return out


def test_one_fsdp2_step_on_two_processes_equals_one_process(two_process_run):
    from safetensors.torch import load_file

    model, _, loss, gnorm, n_loss = _reference(get_tiny_model())
    m = torch.load(two_process_run / "m.pt")
    assert m["rows"][1] >= 3 and m["rows"][1] % 2 == 1  # an odd number of rows: one rank runs a zero-weight pad
    assert int(m["n_loss"]) == int(n_loss)
    torch.testing.assert_close(m["loss"], loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(m["gnorm"], gnorm, rtol=1e-5, atol=1e-6)
    sharded = load_file(two_process_run / "hf" / "model.safetensors")
    ref = model.state_dict()
    gap = max((sharded[k] - ref[k]).abs().max().item() for k in sharded)
    assert set(sharded) <= set(ref)
    print(f"max abs parameter gap after one step: {gap:.3g}")
    assert gap < 1e-6, gap


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_two_process_sharded_checkpoint_resumes_in_one_process(two_process_run):
    ref_model, ref_opt, *_ = _reference(get_tiny_model())
    model, _ = _setup(get_tiny_model())
    optimizer = _optimizer(model)
    vdist.load_sharded(two_process_run / "dcp", model, optimizer)
    for (name, p), q in zip(model.named_parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=name)
        s, r = optimizer.state[p], ref_opt.state[q]
        assert float(s["step"]) == float(r["step"]) == 1.0
        torch.testing.assert_close(s["exp_avg"], r["exp_avg"], rtol=1e-5, atol=1e-8, msg=name)
        torch.testing.assert_close(s["exp_avg_sq"], r["exp_avg_sq"], rtol=1e-5, atol=1e-12, msg=name)


def _losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_torchrun_sft_matches_one_process_and_resumes_in_one(tmp_path):
    recipe = ROOT / "recipes" / "sft_tiny.toml"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "vibeperf",
           "sft", str(recipe), f"output_dir={tmp_path / 'dist'}", "checkpoint.every=1", *SFT_ARGS]  # fmt: skip
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]
    step1 = tmp_path / "dist" / "checkpoints" / "step_00000001"
    assert (step1 / "dcp" / ".metadata").is_file() and (step1 / "model.safetensors").is_file()
    single = train(load_config(SFTConfig, recipe, [f"output_dir={tmp_path / 'one'}", *SFT_ARGS]))
    assert single.steps == 2
    torch.testing.assert_close(_losses(tmp_path / "dist"), _losses(tmp_path / "one"), rtol=1e-6, atol=0)
    resumed = train(load_config(SFTConfig, recipe, [f"output_dir={tmp_path / 'res'}", f"checkpoint.resume={step1}",
                                                    *SFT_ARGS]))  # fmt: skip
    assert resumed.steps == 2
    torch.testing.assert_close(_losses(tmp_path / "res"), _losses(tmp_path / "one")[1:], rtol=1e-6, atol=0)


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
