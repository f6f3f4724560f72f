"""`vibeperf demo`: the most complete real job the project runs today, end to end on the embedded default.

Until the full recipe demo exists (SFT -> MGPO RL -> distillation -> eval -> CLR), this runs its first part for real
and shows learning:
  1. builds the tiny local Qwen2 model and tokenizer (no downloads) and writes the synthetic data (copy and
     arithmetic chats, long copy samples with made-up reference-model verdicts for the difficulty filter);
  2. measures held-out quality of the untrained model: assistant-token NLL (fused LM-head kernel over packed
     rows) and greedy exact-match accuracy on held-out arithmetic;
  3. runs the two-stage SFT curriculum of recipes/sft_tiny.toml (packed rows, varlen attention, fused CE,
     checkpoints, metrics JSONL, loss PNG);
  4. measures the same held-out quality of the trained model and writes a report folder (report.md, summary.json,
     the loss curve, the final Hugging Face checkpoint), then prints a before/after table.

    python -m vibeperf demo [--out runs/demo] [--steps N]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import time
from pathlib import Path

import torch

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "sft_tiny.toml"
BOXED = re.compile(r"\\boxed\{([^{}]*)\}")


def heldout_records(n: int = 48) -> tuple[list, list]:
    """Held-out chats from a seed the training data never uses: (copy records, arith records)."""
    from vibeperf.sft.synthetic import synthetic_records

    return synthetic_records(n, task="copy", seed=7), synthetic_records(n, task="arith", seed=7)


def _as_sft_records(rows: list[dict]):
    from vibeperf.data.jsonl import Message, SFTRecord

    return [SFTRecord((Message("user", r["prompt"]), Message("assistant", r["response"]))) for r in rows]


@torch.no_grad()
def heldout_nll(model, tokenizer, rows: list[dict]) -> float:
    """Mean NLL per assistant token, through the model body and the fused LM-head kernel over packed rows."""
    from vibeperf.kernels import linear_cross_entropy
    from vibeperf.sft.attention import use_varlen_attention
    from vibeperf.sft.packing import pack_rows, tokenize_records

    use_varlen_attention(model, "auto")
    samples = tokenize_records(_as_sft_records(rows), tokenizer)
    total, count = torch.zeros(()), torch.zeros((), dtype=torch.int64)
    body, head = getattr(model, model.base_model_prefix), model.get_output_embeddings()
    for row in pack_rows(samples, 1024):
        hidden = body(**row.model_inputs()).last_hidden_state[0]
        total += linear_cross_entropy(hidden, head.weight, row.targets, reduction="sum")
        count += (row.targets != -100).sum()
    return float(total / count)


@torch.no_grad()
def greedy_answers(model, tokenizer, rows: list[dict], max_new_tokens: int) -> list[str]:
    """Greedy completions of the rows' prompts (transformers generate, left-padded batch)."""
    model.set_attn_implementation("sdpa")
    tokenizer.padding_side = "left"
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": r["prompt"]}], tokenize=False,
                                             add_generation_prompt=True) for r in rows]  # fmt: skip
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)


def arith_accuracy(model, tokenizer, rows: list[dict]) -> float:
    """Exact match of the boxed answer on held-out arithmetic prompts."""
    texts = greedy_answers(model, tokenizer, rows, max_new_tokens=28)
    gold = [BOXED.search(r["response"]).group(1) for r in rows]
    pred = [(m.group(1).strip() if (m := BOXED.search(t)) else None) for t in texts]
    return sum(p == g for p, g in zip(pred, gold)) / len(rows)


def copy_accuracy(model, tokenizer, rows: list[dict]) -> float:
    """Exact match on held-out copy prompts (the assistant must repeat the words)."""
    texts = greedy_answers(model, tokenizer, rows, max_new_tokens=48)
    return sum(t.strip() == r["response"] for t, r in zip(texts, rows)) / len(rows)


def evaluate(model_dir: Path) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    copy, arith = heldout_records()
    return {"heldout_nll": heldout_nll(model, tokenizer, copy + arith),
            "copy_accuracy": copy_accuracy(model, tokenizer, copy),
            "arith_accuracy": arith_accuracy(model, tokenizer, arith)}  # fmt: skip


def run(out: Path, steps: int | None) -> dict:
    from vibeperf.config import SFTConfig, load_config
    from vibeperf.sft.synthetic import write_tiny_data
    from vibeperf.sft.trainer import train
    from vibeperf.tiny_model import get_tiny_model

    t0 = time.time()
    out.mkdir(parents=True, exist_ok=True)
    data = out / "data"
    write_tiny_data(data)
    base = get_tiny_model()
    print(f"[demo] tiny model: {base}")
    before = evaluate(base)
    print(f"[demo] before SFT: {_fmt(before)}")
    overrides = [
        f"output_dir={out / 'sft'}", "checkpoint.every=0", f"model.path={base}",
        f"stages.0.data=['{data / 'sft_tiny_broad.jsonl'}']", f"stages.1.data=['{data / 'sft_tiny_long.jsonl'}']",
        f"stages.1.difficulty.verdicts={data / 'sft_tiny_verdicts.jsonl'}",
    ]  # fmt: skip
    if steps:
        overrides.append(f"train.max_steps={steps}")
    cfg = load_config(SFTConfig, RECIPE, overrides)
    result = train(cfg)
    final = out / "final_checkpoint"
    if final.exists():
        shutil.rmtree(final)
    shutil.copytree(result.last_checkpoint, final)
    after = evaluate(final)
    summary = {"before_sft": before, "after_sft": after, "sft_steps": result.steps, "attention": result.attention,
               "stages": result.stages, "seconds": round(time.time() - t0, 1)}  # fmt: skip
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    write_report(out, summary, result.output_dir)
    return summary


METRICS = [("heldout_nll", "assistant-token NLL (lower is better)", "{:.3f}"),
           ("copy_accuracy", "copy exact match (greedy)", "{:.1%}"),
           ("arith_accuracy", "arithmetic exact match (greedy)", "{:.1%}")]


def _fmt(metrics: dict) -> str:
    return ", ".join(f"{name} {spec.format(metrics[key])}" for key, name, spec in METRICS)


def write_report(out: Path, summary: dict, sft_dir: Path) -> None:
    b, a = summary["before_sft"], summary["after_sft"]
    lines = [
        "# vibeperf demo report", "",
        "| held-out metric | before SFT | after SFT |", "|---|---:|---:|",
        *[f"| {name} | {spec.format(b[key])} | {spec.format(a[key])} |" for key, name, spec in METRICS], "",
        f"SFT: {summary['sft_steps']} optimizer steps over the two-stage curriculum, attention {summary['attention']}.",
        "", f"- metrics: [{sft_dir.name}/metrics.jsonl]({sft_dir.name}/metrics.jsonl)",
        f"- loss curve: ![loss]({sft_dir.name}/loss.png)", "- final checkpoint: [final_checkpoint](final_checkpoint)",
        "- summary: [summary.json](summary.json)", "",
    ]  # fmt: skip
    (out / "report.md").write_text("\n".join(lines))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/demo", help="report folder (default runs/demo)")
    parser.add_argument("--steps", type=int, default=None, help="cap the SFT optimizer steps (default: the recipe)")


def main(args: argparse.Namespace) -> int:
    summary = run(Path(args.out), args.steps)
    b, a = summary["before_sft"], summary["after_sft"]
    print(f"\n{'held-out metric':<40}{'before SFT':>12}{'after SFT':>12}")
    for key, name, spec in METRICS:
        print(f"{name:<40}{spec.format(b[key]):>12}{spec.format(a[key]):>12}")
    print(f"\nreport: {Path(args.out) / 'report.md'} ({summary['seconds']} s)")
    return 0
