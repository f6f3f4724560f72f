"""Long-sequence scoring: per-token log-probs, NLL and entropy of texts under a causal LM, without logits in memory.

`score_samples(model, samples, token_budget=65536)` packs tokenised samples into rows of at most `token_budget`
tokens (best-fit decreasing; a longer sample gets a row of its own, never truncated), runs the model body on each row
with varlen attention (each sample attends only to itself; positions restart per sample), and feeds the row's final
hidden states to the fused LM-head kernel `vibeperf.kernels.linear_logprob`, which never forms the [tokens x vocab]
logits. Memory is bounded by one row: the body's activations of `token_budget` tokens (freed layer by layer under
no_grad) plus the kernel's fixed workspace, so a single 64K-token sequence of a 3B model fits in weights + a few GiB
(benchmark B5). A token is scored when it is a target of the sample's loss mask: for chat records the assistant
tokens (the chat template's tokenisation, as SFT trains on them), for raw text every token after the first.

`vibeperf score` is the command line of it (JSONL in, JSONL out):

    python -m vibeperf score --model /ckpt/qwen --input texts.jsonl --output scores.jsonl [--per-token] [--entropy]

Input lines: `{"text": str}` (raw text, no chat template), or an SFT record (`{"messages": [...]}` or
`{"prompt", "response"}`), each with an optional "id". Output lines, in input order: `{"index", "id"?, "num_tokens",
"nll_sum", "nll_mean", "entropy_mean"?, "logprobs"?, "entropies"?}`; `nll_mean` is the length-normalised NLL (the
learning potential S_LP of offline distillation).
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from vibeperf.data import SFTRecord, write_jsonl
from vibeperf.data.jsonl import get_field, parse_sft_record, read_records

if TYPE_CHECKING:  # vibeperf.model imports transformers: loaded when scoring, not when the CLI builds its parser
    from vibeperf.model import PackedRow, Sample

log = logging.getLogger("vibeperf.score")


@dataclass
class SequenceScore:
    """Scores of one sample over its scored tokens."""

    num_tokens: int
    nll_sum: float
    nll_mean: float
    """-(1/num_tokens) sum_t log p(y_t | y_<t): the length-normalised NLL (0 when nothing is scored)."""
    entropy_mean: float | None = None
    logprobs: list[float] | None = None
    entropies: list[float] | None = None


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """"auto": bf16 on CUDA, fp32 elsewhere; else the named torch dtype."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def load_scorer(path: str, *, dtype: str = "auto", device: str = "auto", attention: str = "auto"):
    """(model, tokenizer) of a local checkpoint ("tiny": the tiny Qwen2) in eval mode with varlen attention."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vibeperf.model import model_path, resolve_device, use_varlen_attention

    src = model_path(path, "model")
    dev = resolve_device(device, "device")
    model = AutoModelForCausalLM.from_pretrained(src, dtype=resolve_dtype(dtype, dev)).to(dev).eval()
    use_varlen_attention(model, attention)
    model.config.use_cache = False
    return model, AutoTokenizer.from_pretrained(src)


def plan_rows(samples: Sequence[Sample], token_budget: int) -> list[PackedRow]:
    """Rows of at most `token_budget` tokens (best-fit decreasing); a longer sample alone in its own row."""
    from vibeperf.model import make_row, pack_rows

    long = [i for i, s in enumerate(samples) if s.length > token_budget]
    short = [i for i, s in enumerate(samples) if s.length <= token_budget]
    rows = [make_row([samples[i]], [i]) for i in long]
    for row in pack_rows([samples[i] for i in short], token_budget):
        row.sample_ids = tuple(short[j] for j in row.sample_ids)
        rows.append(row)
    return rows


@torch.no_grad()
def score_rows(model, rows: Sequence[PackedRow], *, temperature: float = 1.0, entropy: bool = False,
               backend: str = "auto", progress: bool = False):  # fmt: skip
    """Yield (row, logp [T] fp32, entropy [T] fp32 or None) per row: the target log-probs of each position (0 where
    the target is ignored), from the model body's final hidden states through `linear_logprob`."""
    from tqdm.auto import tqdm

    from vibeperf.kernels import linear_logprob
    from vibeperf.model import head_inputs

    device = next(model.parameters()).device
    body, head = getattr(model, model.base_model_prefix), model.get_output_embeddings()
    for row in tqdm(rows, desc="score", disable=not progress, dynamic_ncols=True):
        row = row.to(device)
        hidden = body(**row.model_inputs()).last_hidden_state[0]  # [T, H]
        h, w, b = head_inputs(hidden, head.weight, head.bias)
        del hidden
        out = linear_logprob(h, w, row.targets, bias=b, temperature=temperature, return_entropy=entropy,
                             backend=backend)  # fmt: skip
        logp, ent = out if entropy else (out, None)
        yield row, logp, ent


def score_samples(
    model,
    samples: Sequence[Sample],
    *,
    token_budget: int = 65536,
    temperature: float = 1.0,
    entropy: bool = False,
    per_token: bool = False,
    backend: str = "auto",
    progress: bool = False,
) -> list[SequenceScore]:
    """One `SequenceScore` per sample, in order (see the module docstring)."""
    from vibeperf.model import IGNORE_INDEX

    if token_budget < 2:
        raise ValueError(f"token_budget must be >= 2, got {token_budget}")
    out: list[SequenceScore | None] = [None] * len(samples)
    rows = plan_rows(samples, token_budget)
    for row, logp, ent in score_rows(model, rows, temperature=temperature, entropy=entropy, backend=backend,
                                     progress=progress):  # fmt: skip
        lengths = torch.tensor(row.seq_lengths, device=logp.device)
        seq_index = torch.repeat_interleave(torch.arange(len(lengths), device=logp.device), lengths)  # [T]
        mask = row.targets != IGNORE_INDEX
        # S_LP = NLL / tokens per sample, in fp64 (vibeperf.reference.learning_potential is the oracle)
        nll = torch.zeros(len(lengths), device=logp.device, dtype=torch.float64)
        nll.index_add_(0, seq_index, torch.where(mask, -logp.double(), 0.0))
        count = torch.zeros(len(lengths), device=logp.device).index_add_(0, seq_index, mask.float())
        s_lp = nll / count.double().clamp_min(1)
        nll_sum = nll.tolist()
        ent_mean = None
        if ent is not None:
            ent_mean = torch.zeros(len(lengths), device=logp.device).index_add_(0, seq_index, ent * mask)
            ent_mean = (ent_mean / count.clamp_min(1)).tolist()
        s_lp, count = s_lp.tolist(), count.long().tolist()
        per_lp = per_ent = None
        if per_token:
            per_lp = [x[m].tolist() for x, m in zip(logp.split(row.seq_lengths), mask.split(row.seq_lengths))]
            if ent is not None:
                per_ent = [x[m].tolist() for x, m in zip(ent.split(row.seq_lengths), mask.split(row.seq_lengths))]
        for j, i in enumerate(row.sample_ids):
            out[i] = SequenceScore(
                num_tokens=count[j], nll_sum=nll_sum[j], nll_mean=s_lp[j],
                entropy_mean=None if ent_mean is None else ent_mean[j],
                logprobs=None if per_lp is None else per_lp[j], entropies=None if per_ent is None else per_ent[j],
            )  # fmt: skip
    return out  # type: ignore[return-value]


def text_sample(tokenizer, text: str, source: str = "") -> Sample:
    """A raw-text sample (no chat template, no special tokens added): every token after the first is scored."""
    from vibeperf.model import Sample

    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return Sample(torch.tensor(ids, dtype=torch.int32), torch.ones(len(ids), dtype=torch.bool), 1.0, source)


def _parse_score_line(obj: Mapping[str, Any]) -> tuple[str | None, str | SFTRecord]:
    record_id = get_field(obj, "id", (str, int), default=None)
    record_id = None if record_id is None else str(record_id)
    if "text" in obj:
        return record_id, get_field(obj, "text", (str,), nonempty=True)
    return record_id, parse_sft_record(obj)


def read_score_jsonl(path: str | os.PathLike) -> list[tuple[str | None, str | SFTRecord]]:
    """(id, text or SFTRecord) per line of a scoring input file; DataError naming file:line:field on a bad line."""
    return read_records(path, _parse_score_line)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help='checkpoint directory ("tiny": the tiny local model)')
    parser.add_argument("--input", required=True, help='JSONL: {"text"} or SFT records, optional "id"')
    parser.add_argument("--output", required=True, help="JSONL of scores, one line per input line")
    parser.add_argument("--token-budget", type=int, default=65536, help="tokens per packed row (default 65536)")
    parser.add_argument("--per-token", action="store_true", help="also write every scored token's log-prob")
    parser.add_argument("--entropy", action="store_true", help="also compute the entropy of each position")
    parser.add_argument("--temperature", type=float, default=1.0, help="logits are divided by it (default 1)")
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--backend", default="auto", choices=("auto", "triton", "torch", "cuda"),
                        help="linear_logprob backend")  # fmt: skip
    parser.add_argument("--attention", default="auto", choices=("auto", "varlen", "flex", "exact"))


def run_cli(args: argparse.Namespace) -> int:
    """`vibeperf score`: read, tokenise, score, write (see the module docstring)."""
    from vibeperf.model import tokenize_records

    items = read_score_jsonl(args.input)
    model, tokenizer = load_scorer(args.model, dtype=args.dtype, device=args.device, attention=args.attention)
    sources = [f"{os.fspath(args.input)}:record {i}" for i in range(len(items))]
    chats = [i for i, (_, x) in enumerate(items) if isinstance(x, SFTRecord)]
    samples: list[Sample | None] = [None] * len(items)
    for i, s in zip(chats, tokenize_records([items[i][1] for i in chats], tokenizer, [sources[i] for i in chats])):
        samples[i] = s
    for i, (_, x) in enumerate(items):
        if isinstance(x, str):
            samples[i] = text_sample(tokenizer, x, sources[i])
    scores = score_samples(model, samples, token_budget=args.token_budget, temperature=args.temperature,
                           entropy=args.entropy, per_token=args.per_token, backend=args.backend, progress=True)
    rows = []
    for i, ((record_id, _), s) in enumerate(zip(items, scores)):
        row = {"index": i, **({"id": record_id} if record_id is not None else {}), "num_tokens": s.num_tokens,
               "nll_sum": s.nll_sum, "nll_mean": s.nll_mean}  # fmt: skip
        if args.entropy:
            row["entropy_mean"] = s.entropy_mean
        if args.per_token:
            row["logprobs"] = s.logprobs
            if args.entropy:
                row["entropies"] = s.entropies
        rows.append(row)
    write_jsonl(args.output, rows)
    total = sum(s.num_tokens for s in scores)
    print(f"score: {len(rows)} texts, {total} scored tokens, mean NLL "
          f"{sum(s.nll_sum for s in scores) / max(total, 1):.4f}; {args.output}")  # fmt: skip
    return 0
