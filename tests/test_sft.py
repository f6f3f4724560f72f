"""Packed-sequence SFT on the tiny Qwen2 model (fp32, CPU): tokenisation, packing, varlen attention, the fused loss
against unpacked per-sample losses, the HF patch, the curriculum filters, exact resume, and a falling loss."""

import dataclasses
import json
import logging
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vibeperf import cli
from vibeperf.config import ConfigError, load_config
from vibeperf.data import DataError, Message, SFTRecord, write_jsonl
from vibeperf.model import (
    ATTENTION_CALLS,
    apply_liger,
    make_row,
    pack_rows,
    patch_causal_lm,
    resolve_attention,
    step_flops,
    tokenize_records,
    unpatch_causal_lm,
    use_varlen_attention,
)
from vibeperf.sft import forward_backward, prepare_stages, train
from vibeperf.sft import trainer as trainer_mod
from vibeperf.sft.config import SFTConfig
from vibeperf.sft.synthetic import synthetic_records
from vibeperf.tiny_model import get_tiny_model

ROOT = Path(__file__).resolve().parents[1]
TINY_RECIPE = ROOT / "recipes" / "sft_tiny.toml"


@pytest.fixture(scope="module")
def tiny_path():
    return get_tiny_model()


@pytest.fixture(scope="module")
def tokenizer(tiny_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_path)


def _model(path, attention=None):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    if attention:
        use_varlen_attention(model, attention)
    return model


def _records(n, task="arith", weights=None, seed=0):
    weights = weights or [1.0] * n
    return [SFTRecord((Message("user", r["prompt"]), Message("assistant", r["response"])), w)
            for r, w in zip(synthetic_records(n, task=task, seed=seed), weights)]  # fmt: skip


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def test_tokenize_trains_only_assistant_tokens(tokenizer):
    rec = SFTRecord((Message("system", "Be brief."), Message("user", "Say hi."), Message("assistant", "hi there"),
                     Message("user", "Again?"), Message("assistant", "hello again")))  # fmt: skip
    (s,) = tokenize_records([rec], tokenizer)
    full = tokenizer.apply_chat_template([{"role": m.role, "content": m.content} for m in rec.messages], tokenize=False)
    assert tokenizer.decode(s.input_ids) == full
    runs, cur = [], []
    for tid, m in zip(s.input_ids.tolist(), s.loss_mask.tolist()):
        if m:
            cur.append(tid)
        elif cur:
            runs.append(tokenizer.decode(cur))
            cur = []
    assert runs == ["hi there<|im_end|>", "hello again<|im_end|>"]
    assert s.labels().tolist() == [t if m else -100 for t, m in zip(s.input_ids.tolist(), s.loss_mask.tolist())]


def test_pack_rows_positions_targets_and_determinism(tokenizer):
    samples = tokenize_records(_records(7, task="copy"), tokenizer)
    budget = 2 * max(s.length for s in samples) + 5
    rows = pack_rows(samples, budget)
    assert sorted(i for r in rows for i in r.sample_ids) == list(range(7))
    assert all(r.num_tokens <= budget for r in rows)
    for row in rows:
        cu = row.cu_seqlens.tolist()
        assert cu[0] == 0 and cu[-1] == row.num_tokens and row.cu_seqlens.dtype == torch.int32
        assert row.max_seqlen == max(row.seq_lengths)
        for j, i in enumerate(row.sample_ids):
            s, (a, b) = samples[i], (cu[j], cu[j + 1])
            assert torch.equal(row.input_ids[a:b], s.input_ids.long())
            assert torch.equal(row.position_ids[a:b], torch.arange(s.length))
            assert torch.equal(row.targets[a:b - 1], s.labels()[1:]) and row.targets[b - 1] == -100
    again = pack_rows(samples, budget)
    assert [r.sample_ids for r in again] == [r.sample_ids for r in rows]
    assert all(torch.equal(x.input_ids, y.input_ids) for x, y in zip(again, rows))


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_varlen_attention_matches_per_sample_and_isolates_samples(tiny_path, tokenizer):
    samples = tokenize_records(_records(4, task="copy"), tokenizer)
    packed, plain = _model(tiny_path, "exact"), _model(tiny_path)
    row = make_row(samples)
    cu = row.cu_seqlens.tolist()
    with torch.no_grad():
        hidden = packed.model(**row.model_inputs()).last_hidden_state[0]
        for i, s in enumerate(samples):
            alone = plain.model(input_ids=s.input_ids.long()[None]).last_hidden_state[0]
            assert _rel(hidden[cu[i] : cu[i + 1]], alone) < 1e-6
        changed = list(samples)
        ids = changed[1].input_ids.clone()
        ids[2:] = (ids[2:] * 7 + 3) % 1000
        changed[1] = dataclasses.replace(changed[1], input_ids=ids)
        hidden2 = packed.model(**make_row(changed).model_inputs()).last_hidden_state[0]
        for i in range(4):
            same = torch.equal(hidden[cu[i] : cu[i + 1]], hidden2[cu[i] : cu[i + 1]])
            assert same == (i != 1)
        use_varlen_attention(packed, "flex")  # FlexAttention runs on the CPU without backward
        flex = packed.model(**row.model_inputs()).last_hidden_state[0]
    assert _rel(flex, hidden) < 1e-5


def test_attention_backend_rule():
    assert resolve_attention("auto", "cpu", torch.float32)[0] == "exact"
    assert resolve_attention("auto", "cpu", torch.bfloat16)[0] == "exact"
    with pytest.raises(RuntimeError, match="'varlen' cannot run on cpu"):
        resolve_attention("varlen", "cpu", torch.bfloat16)
    with pytest.raises(ValueError):
        resolve_attention("flash", "cpu", torch.float32)


@pytest.mark.parametrize("backend,n", [("torch", 6), ("triton", 2)], ids=["torch-6-samples", "triton-2-samples"])
def test_packed_loss_and_grads_equal_unpacked(tiny_path, tokenizer, backend, n):
    weights = [1.0, 0.5, 2.0, 1.0, 0.0, 1.5][:n]
    samples = tokenize_records(_records(n, weights=weights), tokenizer)
    rows = pack_rows(samples, 2 * max(s.length for s in samples))
    assert len(rows) < n
    packed, plain = _model(tiny_path, "exact"), _model(tiny_path)
    loss, n_loss = forward_backward(packed, rows, loss_backend=backend)
    total_tokens = sum(s.num_loss_tokens for s in samples)
    assert int(n_loss) == total_tokens
    ref = 0.0
    for s in samples:  # HF's own loss (mean over the sample's targets), one sample at a time
        out = plain(input_ids=s.input_ids.long()[None], labels=s.labels()[None])
        ref = ref + out.loss * s.num_loss_tokens * s.weight / total_tokens
    ref.backward()
    assert _rel(loss, ref.detach()) < 1e-6
    for (name, p), q in zip(packed.named_parameters(), plain.parameters()):
        assert _rel(p.grad, q.grad) < 1e-5, name


def test_bf16_autocast_step_keeps_fp32_head_gradient(tiny_path, tokenizer):
    """Under bf16 autocast with fp32 weights the fused head takes the fp32 weight as it is (`head_inputs`) and runs
    its GEMMs without autocast (the engine picks their dtypes): the head's gradient comes back in fp32 from the op's
    accumulator, never rounded to bf16 as transformers' autocast path rounds it, and the step's gradients are as
    close to the fp32 step's as transformers' on the same samples, within 2x."""
    samples = tokenize_records(_records(3, task="copy"), tokenizer)
    rows = pack_rows(samples, sum(s.length for s in samples))
    assert len(rows) == 1  # one op call: its dW is the head's whole gradient
    total = sum(s.num_loss_tokens for s in samples)

    def ours(autocast):
        model = _model(tiny_path, "exact")
        forward_backward(model, rows, loss_backend="torch", autocast_dtype=torch.bfloat16 if autocast else None)
        return {n: p.grad for n, p in model.named_parameters()}

    def theirs():
        model = _model(tiny_path)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = sum(model(input_ids=s.input_ids.long()[None], labels=s.labels()[None]).loss * s.num_loss_tokens
                       for s in samples) / total  # fmt: skip
        loss.backward()
        return {n: p.grad for n, p in model.named_parameters()}

    ref, mine, hf = ours(False), ours(True), theirs()
    head = mine["lm_head.weight"]  # the tiny model's head is untied: its gradient is the fused op's dW alone
    assert head.dtype == torch.float32 and not torch.equal(head, head.bfloat16().float())  # never rounded to bf16
    assert torch.equal(hf["lm_head.weight"], hf["lm_head.weight"].bfloat16().float())  # transformers' is
    for name in ref:
        assert _rel(mine[name], ref[name]) <= 2 * _rel(hf[name], ref[name]) + 1e-6, name


def test_patch_causal_lm_matches_hf_loss_and_grads(tiny_path, tokenizer):
    samples = tokenize_records(_records(2, task="copy"), tokenizer)
    t = max(s.length for s in samples)
    ids = torch.full((2, t), tokenizer.pad_token_id)
    labels = torch.full((2, t), -100)
    mask = torch.zeros(2, t, dtype=torch.long)
    for i, s in enumerate(samples):
        ids[i, : s.length], labels[i, : s.length], mask[i, : s.length] = s.input_ids, s.labels(), 1
    ref_model, model = _model(tiny_path), patch_causal_lm(_model(tiny_path), backend="torch")
    ref = ref_model(input_ids=ids, attention_mask=mask, labels=labels)
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert out.logits is None
    ref.loss.backward()
    out.loss.backward()
    assert _rel(out.loss.detach(), ref.loss.detach()) < 1e-6
    for (name, p), q in zip(model.named_parameters(), ref_model.parameters()):
        assert _rel(p.grad, q.grad) < 1e-5, name
    n_items = torch.tensor(17)
    summed = model(input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=n_items).loss
    ref_sum = ref_model(input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=n_items).loss
    assert _rel(summed.detach(), ref_sum.detach()) < 1e-6
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, ref_model(input_ids=ids,
                           attention_mask=mask).logits)  # fmt: skip
    assert patch_causal_lm(model) is model and "forward" not in vars(unpatch_causal_lm(model))


def _write_data(tmp_path, name, records):
    path = tmp_path / name
    write_jsonl(path, records)
    return str(path)


def _cfg(tmp_path, data, overrides=(), **stage):
    base = [f"output_dir={tmp_path / 'run'}", f"stages.0.data=[{json.dumps(data)}]", "train.loss_backend=torch",
            "train.device=cpu", "logging.progress=false", "logging.plot=false", "logging.every=1"]  # fmt: skip
    cfg = load_config(SFTConfig, TINY_RECIPE, base + list(overrides))
    cfg.stages = [dataclasses.replace(cfg.stages[0], **stage)]
    return cfg


def test_curriculum_filters(tmp_path, tokenizer, caplog):
    words = "one two three four five six seven eight nine ten".split()
    recs = [{"id": f"r{i}", "prompt": f"Say the words ({i}).", "response": " ".join(words[:3 * i % 10 + 1] * (i + 1))}
            for i in range(12)]  # fmt: skip
    verdicts = [{"id": r["id"], "verdicts": [int(k < i % 4 * 3) for k in range(8)]} for i, r in enumerate(recs[:10])]
    verdicts[4] = {"prompt": recs[4]["prompt"] + " ", "verdicts": verdicts[4]["verdicts"]}  # no match: dropped
    verdicts[8] = {"prompt": recs[8]["prompt"], "verdicts": verdicts[8]["verdicts"]}  # matched by prompt
    for r in recs[8:]:
        del r["id"]
    data = _write_data(tmp_path, "long.jsonl", recs)
    vpath = _write_data(tmp_path, "verdicts.jsonl", verdicts)
    samples = tokenize_records([SFTRecord((Message("user", r["prompt"]), Message("assistant", r["response"])))
                                for r in recs], tokenizer)  # fmt: skip
    lengths = sorted(s.length for s in samples)
    min_tokens, budget = lengths[3], lengths[7]
    cfg = _cfg(tmp_path, data, [f"stages.0.difficulty.verdicts={vpath}", f"stages.0.min_tokens={min_tokens}",
                                f"stages.0.token_budget={budget}"])  # fmt: skip
    long_enough = {i for i, s in enumerate(samples) if s.length >= min_tokens}
    hard = {i for i in range(10) if 1 - sum(verdicts[i]["verdicts"]) / 8 >= 0.75} - {4}
    with caplog.at_level(logging.INFO, logger="vibeperf.sft"):
        (stage,) = prepare_stages(cfg, tokenizer)
    kept = sorted(long_enough & hard)
    assert 8 in kept
    assert [s.source for s in stage.samples] == [f"{data}:{i + 1}" for i in kept]
    assert stage.stats["too_short"] == 12 - len(long_enough)
    assert stage.stats["no_verdicts"] == len(long_enough & {4, 9, 10, 11})
    assert stage.stats["truncated"] == sum(samples[i].length > budget for i in kept) > 0
    assert all(s.length <= budget for s in stage.samples)
    text = caplog.text
    assert "precomputed verdicts" in text and "rollout engine does not exist yet" in text
    assert f"{stage.stats['truncated']} of {len(kept)} samples are longer than token_budget={budget}" in text


BAD_DATA = [
    ("sft-field", "data", '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": 5}]}',
     ":3: field 'messages[1].content': expected a string, got int"),
    ("sft-json", "data", '{"prompt": "a", "response": ', ":3: invalid JSON"),
    ("verdict-count", "verdicts", '{"id": "x", "verdicts": [1, 0]}', ":3: field 'verdicts': expected 8 verdicts"),
    ("verdict-value", "verdicts", '{"id": "x", "verdicts": [2, 0, 0, 0, 0, 0, 0, 0]}', ":3: field 'verdicts'"),
    ("verdict-key", "verdicts", '{"verdicts": [0, 0, 0, 0, 0, 0, 0, 0]}', ":3: field 'id': missing"),
]


@pytest.mark.parametrize("which,line,needle", [c[1:] for c in BAD_DATA], ids=[c[0] for c in BAD_DATA])
def test_malformed_line_fails_before_training(tmp_path, monkeypatch, which, line, needle):
    good = json.dumps({"id": "a", "prompt": "p", "response": "r"})
    good_v = json.dumps({"id": "a", "verdicts": [0] * 8})
    lines = {"data": [good, good, good], "verdicts": [good_v.replace('"a"', f'"{k}"') for k in "abc"]}
    lines[which][2] = line
    data, verdicts = tmp_path / "data.jsonl", tmp_path / "verdicts.jsonl"
    data.write_text("\n".join(lines["data"]) + "\n")
    verdicts.write_text("\n".join(lines["verdicts"]) + "\n")
    cfg = _cfg(tmp_path, str(data), [f"stages.0.difficulty.verdicts={verdicts}"])
    monkeypatch.setattr(trainer_mod, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(DataError) as e:
        train(cfg)
    assert f"{data if which == 'data' else verdicts}{needle}" in str(e.value)
    assert not (tmp_path / "run").exists()


def test_step_flops_formula(tiny_path):
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(tiny_path)
    d = cfg.hidden_size // cfg.num_attention_heads
    assert step_flops(cfg, 1000, [3, 4]) == 6 * 1000 * 7 + 6 * cfg.num_hidden_layers * cfg.num_attention_heads * d * 25


@pytest.mark.skipif(__import__("importlib").util.find_spec("liger_kernel") is not None, reason="liger is installed")
def test_liger_switch_without_liger_is_a_clear_error(tiny_path):
    with pytest.raises(RuntimeError, match="model.liger = true needs liger_kernel"):
        apply_liger(_model(tiny_path))


def _state(ckpt: Path):
    blob = torch.load(ckpt / "trainer_state.pt", weights_only=False)
    return load_file(ckpt / "model.safetensors"), blob["optimizer"], blob["scheduler"]


def test_resume_is_bit_identical(tmp_path):
    data = _write_data(tmp_path, "copy.jsonl", synthetic_records(48, task="copy"))
    common = [f"stages.0.data=[{json.dumps(data)}]", "stages.0.token_budget=128", "train.global_batch=8"]
    full = _cfg(tmp_path / "a", data, common + ["train.max_steps=4"])
    half = _cfg(tmp_path / "b", data, common + ["train.max_steps=2"])
    rest = _cfg(tmp_path / "b", data, common + ["train.max_steps=4", "checkpoint.resume=latest"])
    ra, rb, rc = train(full), train(half), train(rest)
    assert (ra.steps, rb.steps, rc.steps) == (4, 2, 4)
    assert rc.last_checkpoint.name == "step_00000004" and set(ra.attention) == {"exact"}
    params_a, opt_a, sched_a = _state(ra.last_checkpoint)
    params_c, opt_c, sched_c = _state(rc.last_checkpoint)
    assert params_a.keys() == params_c.keys()
    assert all(torch.equal(params_a[k], params_c[k]) for k in params_a)
    assert opt_a["param_groups"] == opt_c["param_groups"]
    for k, st in opt_a["state"].items():
        assert all(torch.equal(v, opt_c["state"][k][n]) for n, v in st.items())
    assert sched_a == sched_c
    losses = lambda r: [json.loads(x)["loss"] for x in (r.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert losses(ra) == losses(rc)
    state = json.loads((rc.last_checkpoint / "trainer_state.json").read_text())
    assert (state["step"], state["stage_name"], state["epoch"], state["batch"]) == (4, "broad", 0, 4)
    changed = _cfg(tmp_path / "b", data, common + ["train.global_batch=4", "checkpoint.resume=latest"])
    with pytest.raises(ConfigError, match="checkpoint.resume: .*batch size, seed or stages changed"):
        train(changed)


def test_training_loss_falls_via_cli(tmp_path, capsys):
    out = tmp_path / "run"
    code = cli.main(["sft", str(TINY_RECIPE), f"output_dir={out}", "train.loss_backend=torch", "train.device=cpu",
                     "logging.progress=false", "logging.every=4", "checkpoint.save_final=false"])
    assert code == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 54 and all(math.isfinite(r["loss"]) for r in rows)
    first, last = rows[0]["loss"], min(r["loss"] for r in rows[-3:])
    assert last < 0.4 * first, (first, last)
    assert set(rows[0]["attention"]) == {"exact"} and set(ATTENTION_CALLS) == {"exact"}
    assert (out / "loss.png").stat().st_size > 0 and "sft: 54 steps" in capsys.readouterr().out


@pytest.mark.gpu
def test_gpu_varlen_and_flex_match_exact(tiny_path, tokenizer, monkeypatch):
    # conftest's NaN poisoning of new_empty fills a requires-grad leaf in place, which compiled FlexAttention's
    # tracing rejects; the unpoisoned method is used for this test.
    unpoisoned = getattr(torch.Tensor.new_empty, "__wrapped__", torch.Tensor.new_empty)
    monkeypatch.setattr(torch.Tensor, "new_empty", unpoisoned)
    samples = tokenize_records(_records(5, task="copy"), tokenizer)
    row = make_row(samples).to("cuda")
    outs, grads = {}, {}
    for backend in ("exact", "varlen", "flex"):
        model = _model(tiny_path, backend).cuda()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            hidden = model.model(**row.model_inputs()).last_hidden_state[0]
        hidden.float().square().mean().backward()
        outs[backend] = hidden.detach().float()
        grads[backend] = model.model.layers[0].self_attn.q_proj.weight.grad.float()
    assert resolve_attention("auto", "cuda", torch.bfloat16)[0] == "varlen"
    for backend in ("varlen", "flex"):  # bf16 matmuls: a few units of 2^-8
        assert _rel(outs[backend], outs["exact"]) < 2e-2, backend
        assert _rel(grads[backend], grads["exact"]) < 5e-2, backend


@pytest.mark.gpu
def test_gpu_training_run(tmp_path):
    """12 steps on the GPU, eager blocks: the attention calls are counted per backend (compiled blocks, the CUDA
    default, are not counted, since a traced counter would recompile per value: test_body covers compiled steps)."""
    out = tmp_path / "run"
    cfg = load_config(SFTConfig, TINY_RECIPE, [f"output_dir={out}", "train.device=cuda", "train.max_steps=12",
                                               "logging.progress=false", "logging.every=4",
                                               "model.compile=false"])  # fmt: skip
    result = train(cfg)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert result.steps == 12 and set(result.attention) == {"varlen"}
    assert rows[-1]["loss"] < rows[0]["loss"] and rows[-1]["mfu"] is not None
