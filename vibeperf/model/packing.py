"""Samples and packed rows: one micro-batch holds several samples back to back, each attending only to itself.

Packing (`pack_rows`): the samples of one optimizer step go into rows of at most `budget` tokens by best-fit
decreasing (`vibeperf.packing.pack_lengths`, ties and order fixed, so the same samples give the same rows). A row
holds the samples back to back with
- `position_ids` restarting at 0 at every sample (RoPE sees each sample as if alone),
- `cu_seqlens` [S+1] (int32) the sample boundaries, for varlen attention (`vibeperf.model.attention`),
- `targets` the next-token labels, shifted inside each sample: position t of a sample predicts token t+1 of the
  same sample, or is -100 (the last token of every sample predicts nothing, so no loss crosses a boundary),
- `token_weight` the sample's loss weight at each position.
Samples longer than the budget must be cut first (`truncate`, which counts them for the caller's warning).
Samples come from `vibeperf.model.chat.tokenize_records` (chat records) or are built directly (RL sequences).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from vibeperf.packing import bins_to_rows, pack_lengths

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Sample:
    """One tokenised conversation.

    input_ids: [L] int32 token ids. loss_mask: [L] bool, True on the tokens trained as targets (assistant tokens).
    weight: the record's loss weight. source: `file:line` of the record, for messages.
    """

    input_ids: torch.Tensor
    loss_mask: torch.Tensor
    weight: float = 1.0
    source: str = ""

    @property
    def length(self) -> int:
        return int(self.input_ids.numel())

    @property
    def num_loss_tokens(self) -> int:
        """Targets this sample contributes (its first token is never predicted)."""
        return int(self.loss_mask[1:].sum())

    def labels(self) -> torch.Tensor:
        """[L] int64 labels in the Hugging Face convention (unshifted; -100 where no loss)."""
        return torch.where(self.loss_mask, self.input_ids.long(), IGNORE_INDEX)


def truncate(samples: Sequence[Sample], budget: int) -> tuple[list[Sample], int]:
    """Samples cut to at most `budget` tokens (the first ones are kept), and how many were cut."""
    out, cut = [], 0
    for s in samples:
        if s.length > budget:
            s = dataclasses.replace(s, input_ids=s.input_ids[:budget], loss_mask=s.loss_mask[:budget])
            cut += 1
        out.append(s)
    return out, cut


@dataclass
class PackedRow:
    """Samples packed back to back into one row of T tokens (one micro-batch).

    input_ids, position_ids, targets: [T] int64; token_weight: [T] float32; cu_seqlens: [S+1] int32 on the same
    device; max_seqlen: longest sample (host int); seq_lengths: the S sample lengths (host); sample_ids: which of
    the samples given to `pack_rows` the row holds, in row order.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    targets: torch.Tensor
    token_weight: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    seq_lengths: tuple[int, ...]
    sample_ids: tuple[int, ...]

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())

    def to(self, device: torch.device | str) -> PackedRow:
        """The same row with its tensors on `device` (non-blocking copies)."""
        move = lambda t: t.to(device, non_blocking=True)
        return dataclasses.replace(
            self, input_ids=move(self.input_ids), position_ids=move(self.position_ids), targets=move(self.targets),
            token_weight=move(self.token_weight), cu_seqlens=move(self.cu_seqlens),
        )  # fmt: skip

    def model_inputs(self) -> dict:
        """Keyword arguments of the model body for this row: [1, T] ids and positions plus the varlen metadata."""
        return {
            "input_ids": self.input_ids[None],
            "position_ids": self.position_ids[None],
            "cu_seq_lens_q": self.cu_seqlens,
            "cu_seq_lens_k": self.cu_seqlens,
            "max_length_q": self.max_seqlen,
            "max_length_k": self.max_seqlen,
            "use_cache": False,
        }


def make_row(samples: Sequence[Sample], sample_ids: Sequence[int] | None = None) -> PackedRow:
    """Concatenate `samples` into one row (no budget check), building positions, shifted targets and cu_seqlens."""
    ids, pos, tgt, wts = [], [], [], []
    for s in samples:
        x = s.input_ids.long()
        ids.append(x)
        pos.append(torch.arange(s.length, dtype=torch.int64))
        nxt = torch.where(s.loss_mask[1:], x[1:], IGNORE_INDEX)
        tgt.append(torch.cat([nxt, nxt.new_full((1,), IGNORE_INDEX)]))
        wts.append(torch.full((s.length,), s.weight, dtype=torch.float32))
    lengths = [s.length for s in samples]
    cu = torch.zeros(len(samples) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths, dtype=torch.int32).cumsum(0)
    return PackedRow(torch.cat(ids), torch.cat(pos), torch.cat(tgt), torch.cat(wts), cu, max(lengths),
                     tuple(lengths), tuple(range(len(samples)) if sample_ids is None else sample_ids))  # fmt: skip


def pack_rows(samples: Sequence[Sample], budget: int, *, backend: str = "auto") -> list[PackedRow]:
    """Pack `samples` (each at most `budget` tokens) into rows by best-fit decreasing; deterministic.

    Rows come in bin order; inside a row the samples keep their order in `samples`.
    """
    if not samples:
        return []
    bins = pack_lengths([s.length for s in samples], budget, backend=backend)
    return [make_row([samples[i] for i in row], row) for row in bins_to_rows(bins)]
