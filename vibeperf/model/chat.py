"""Chat-template tokenisation with assistant-only loss: SFT records -> `Sample`s.

Each conversation is rendered with the tokenizer's chat template and tokenised once (with character offsets). The
loss-bearing characters of assistant message i run from the end of the rendered prefix `messages[:i]` + generation
prompt (so the `<|im_start|>assistant\\n` header is context, not target) through the end of its eos token
(`<|im_end|>`; the newline the template writes after it is not trained). A token carries loss when its first
character lies in such a span; every other token gets label -100. This needs a template that renders each
conversation prefix as a prefix of the whole (ChatML and Qwen2.5's do); one that does not is a `DataError`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from vibeperf.data import DataError, SFTRecord
from vibeperf.model.packing import Sample


def _render(tokenizer, messages: list[dict], generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def assistant_spans(tokenizer, record: SFTRecord, source: str = "") -> tuple[str, list[tuple[int, int]]]:
    """The rendered text of `record` and the [start, end) character spans that carry loss (see the module doc)."""
    messages = [{"role": m.role, "content": m.content} for m in record.messages]
    text = _render(tokenizer, messages)
    eos = tokenizer.eos_token or ""
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        upto = _render(tokenizer, messages[: i + 1])
        if not text.startswith(upto):
            raise DataError(
                f"{source}: the chat template does not render the conversation up to message {i} as a "
                "prefix of the whole conversation, so the assistant tokens cannot be located"
            )
        start = 0
        if i > 0:
            prompt = _render(tokenizer, messages[:i], generation_prompt=True)
            if not upto.startswith(prompt):
                raise DataError(
                    f"{source}: the chat template's generation prompt before message {i} is not a "
                    "prefix of the rendered conversation, so the assistant tokens cannot be located"
                )
            start = len(prompt)
        cut = upto.rfind(eos, start) if eos else -1
        end = cut + len(eos) if cut >= 0 else len(upto)
        if i == 0:  # no prompt to render before a leading assistant message: find its content instead
            stop = cut if cut >= 0 else end
            start = max(upto.rfind(m["content"], 0, stop), 0) if m["content"] else stop
        spans.append((start, end))
    return text, spans


def tokenize_records(
    records: Sequence[SFTRecord], tokenizer, sources: Sequence[str] | None = None, *, batch_size: int = 512
) -> list[Sample]:
    """Tokenise `records` with the chat template; loss only on assistant tokens. Order is kept."""
    if sources is None:
        sources = [f"record {i}" for i in range(len(records))]
    out = []
    for b0 in range(0, len(records), batch_size):
        texts, all_spans = [], []
        for rec, src in zip(records[b0 : b0 + batch_size], sources[b0 : b0 + batch_size]):
            text, spans = assistant_spans(tokenizer, rec, src)
            texts.append(text)
            all_spans.append(spans)
        enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
        for j, (ids, offsets, spans) in enumerate(zip(enc["input_ids"], enc["offset_mapping"], all_spans)):
            starts = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)[:, 0]
            mask = np.zeros(len(ids), dtype=bool)
            for a, b in spans:
                mask |= (starts >= a) & (starts < b)
            rec = records[b0 + j]
            out.append(Sample(torch.tensor(ids, dtype=torch.int32), torch.from_numpy(mask), rec.weight,
                              sources[b0 + j]))  # fmt: skip
    return out
