"""The locally built tiny Qwen2 checkpoint loads and runs like a Hugging Face one, deterministically and atomically."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, PreTrainedTokenizerFast

from vibeperf import tiny_model
from vibeperf.tiny_model import MARKER, build_tiny_model, get_tiny_model, tiny_model_dir


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


def test_loads_like_a_hf_checkpoint(model_dir):
    names = {p.name for p in model_dir.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", MARKER} <= names
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    cfg = model.config
    assert type(model).__name__ == "Qwen2ForCausalLM" and model.dtype == torch.float32
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (128, 2, 4, 2)
    assert cfg.intermediate_size == 256 and cfg.max_position_embeddings == 4096 and not cfg.tie_word_embeddings
    assert model.model.layers[0].self_attn.head_dim == 32
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    tok = AutoTokenizer.from_pretrained(model_dir)
    assert isinstance(tok, PreTrainedTokenizerFast) and len(tok) == cfg.vocab_size == 1024
    ids = tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    assert ids == [1021, 1022, 1023]
    assert (tok.eos_token, tok.pad_token, tok.eos_token_id, tok.pad_token_id) == (
        "<|im_end|>",
        "<|endoftext|>",
        1023,
        1021,
    )
    gen = GenerationConfig.from_pretrained(model_dir)
    assert gen.eos_token_id == [1023, 1021] and gen.pad_token_id == 1021


def test_forward_and_loss(model_dir):
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    batch = tok(["def add(a, b):\n    return a + b", "Ada has 3 apples."], return_tensors="pt", padding=True)
    out = model(**batch, labels=batch["input_ids"])
    assert out.logits.shape == (2, batch["input_ids"].shape[1], 1024)
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.loss)
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_chat_template_and_round_trip(model_dir):
    tok = AutoTokenizer.from_pretrained(model_dir)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+3?"}]
    text = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2+3?<|im_end|>\n"
    assert tok.apply_chat_template(messages, tokenize=False) == text
    prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == text + "<|im_start|>assistant\n"
    ids = tok(prompt)["input_ids"]
    assert ids[0] == 1022 and ids.count(1023) == 2
    for s in (prompt, "Ünïcödé  text\twith\r\nodd  spacing  ", "print(sum(range(10)))"):
        assert tok.decode(tok(s)["input_ids"]) == s


def test_deterministic(model_dir, tmp_path):
    again = build_tiny_model(tmp_path / "again")
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json", MARKER):
        assert (again / name).read_bytes() == (model_dir / name).read_bytes(), name
    a, b = load_file(model_dir / "model.safetensors"), load_file(again / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    other = load_file(build_tiny_model(tmp_path / "seed1", seed=1) / "model.safetensors")
    assert not torch.equal(a["model.embed_tokens.weight"], other["model.embed_tokens.weight"])
    assert _leftovers(tmp_path) == []


def test_reuse_overwrite_and_refusals(model_dir, tmp_path):
    stamp = (model_dir / "model.safetensors").stat().st_mtime_ns
    assert build_tiny_model(model_dir) == model_dir
    assert (model_dir / "model.safetensors").stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="other arguments"):
        build_tiny_model(model_dir, seed=1)
    with pytest.raises(ValueError, match="num_heads"):
        build_tiny_model(tmp_path / "bad", num_heads=3)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        build_tiny_model(foreign)
    assert (foreign / "notes.txt").read_text() == "keep me"
    build_tiny_model(foreign, num_layers=1, vocab_size=1040, overwrite=True)
    assert not (foreign / "notes.txt").exists()
    cfg = json.loads((foreign / "config.json").read_text())
    assert (cfg["num_hidden_layers"], cfg["vocab_size"]) == (1, 1040)
    with pytest.raises(ValueError, match="smaller than the tokenizer"):
        build_tiny_model(tmp_path / "small", vocab_size=1000)
    assert _leftovers(tmp_path) == []


def test_losing_a_build_race_returns_the_winner(tmp_path, monkeypatch):
    out, write = tmp_path / "model", tiny_model._write

    def write_then_lose(tmp, **kwargs):
        write(tmp, **kwargs)
        monkeypatch.setattr(tiny_model, "_write", write)
        build_tiny_model(out)

    monkeypatch.setattr(tiny_model, "_write", write_then_lose)
    path = build_tiny_model(out)
    assert path == out and (out / MARKER).is_file() and _leftovers(tmp_path) == []


def test_cached_builder_in_parallel_processes(tmp_path, monkeypatch):
    monkeypatch.setenv("VIBEPERF_CACHE", str(tmp_path))
    code = "from vibeperf.tiny_model import get_tiny_model; print(get_tiny_model())"
    # The working directory is not the repository root, whose `kernels/` folder would shadow Hugging Face's package.
    other = subprocess.Popen(
        [sys.executable, "-c", code], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    here = get_tiny_model()
    out, err = other.communicate(timeout=120)
    assert other.returncode == 0, err
    assert here == Path(out.strip()) == tiny_model_dir() == tmp_path / "tiny-qwen2-v1"
    assert (here / MARKER).is_file() and _leftovers(tmp_path) == []
    assert get_tiny_model() == here
