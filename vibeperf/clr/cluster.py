"""Clustering the K answers of a query by mathematical equivalence, with caches so math-verify runs rarely.

`AnswerClusterer.cluster(answers)` numbers clusters 0, 1, ... in first-seen order:

- An answer is first normalised (`normalise_answer`: spacing, `$`, `\\left`/`\\right`, `\\dfrac`/`\\tfrac`, a final
  period, thin spaces); answers with equal normalised text share a cluster without any parse or comparison.
- A new normalised text is compared with the representative (first member) of each existing cluster, in order, with
  `math_verify.verify(representative, answer)` (the representative on the gold side, as a grader would), and joins
  the first it matches; else it opens a new cluster. Each normalised text is parsed once and each ordered pair of
  normalised texts is compared once per clusterer (the caches live as long as it does, across queries). An answer
  math-verify cannot parse matches only its own normalised text.
- A missing answer (None or blank) joins the one "no answer" cluster, numbered in first-seen order like the others.
  `vibeperf.clr.pipeline` never lets it win unless every answer of the query is missing.

With D distinct normalised answers in C clusters, a query costs at most D parses and D * C comparisons, against K^2
for comparing every pair of the K answers; `stats` counts them. `matches_gold(gold, answer)` grades an answer with
`vibeperf.rewards.math.math_reward`, cached by (gold, normalised answer).

Timeouts follow `vibeperf.rewards.math`: math-verify's signal timeouts apply in the main thread only.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from math_verify import parse, verify

from vibeperf.rewards.math import math_reward, signal_timeout

_SPACES = re.compile(r"\s+|\\[,;:! ]|\\q?quad\b")
_SIZING = re.compile(r"\\(?:left|right|big|Big|bigg|Bigg)(?![a-zA-Z])")


def normalise_answer(answer: str) -> str:
    """The answer with spacing, `$`, sizing commands, `\\dfrac`/`\\tfrac` and a final period removed."""
    text = _SIZING.sub("", answer.strip().rstrip(".").strip().strip("$"))
    text = text.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    return _SPACES.sub("", text).rstrip(".")


@dataclass(frozen=True)
class Clustering:
    """The clusters of one query's answers."""

    ids: list[int]
    """Cluster id of each answer, numbered 0, 1, ... in first-seen order."""
    answers: list[str | None]
    """Each cluster's representative answer (its first member, as written); None for the "no answer" cluster."""
    sizes: list[int]
    """Members of each cluster."""
    no_answer_id: int | None
    """Id of the "no answer" cluster, None when every answer is present."""


class AnswerClusterer:
    """Equivalence clustering of answers with parse and comparison caches (see the module docstring)."""

    def __init__(self, timeout_s: int | None = 5):
        self.timeout_s = timeout_s
        self._parsed: dict[str, list] = {}
        self._equal: dict[tuple[str, str], bool] = {}
        self._graded: dict[tuple[str, str], bool] = {}
        self.stats: Counter[str] = Counter()
        """parse_calls, verify_calls, verify_cache_hits, verify_errors, same_text, grade_calls, grade_cache_hits."""

    def _parse(self, key: str) -> list:
        if key not in self._parsed:
            self.stats["parse_calls"] += 1
            try:
                self._parsed[key] = parse(f"\\boxed{{{key}}}", parsing_timeout=signal_timeout(self.timeout_s))
            # An unparseable answer is still an answer: it matches its own text only.
            except Exception:
                self.stats["parse_errors"] += 1
                self._parsed[key] = []
        return self._parsed[key]

    def equivalent(self, representative: str, answer: str) -> bool:
        """Whether two normalised answers are equal, or math-verify finds `answer` equivalent to `representative`."""
        if representative == answer:
            self.stats["same_text"] += 1
            return True
        pair = (representative, answer)
        if pair in self._equal:
            self.stats["verify_cache_hits"] += 1
            return self._equal[pair]
        gold, pred = self._parse(representative), self._parse(answer)
        result = False
        if gold and pred:
            self.stats["verify_calls"] += 1
            try:
                result = bool(verify(gold, pred, timeout_seconds=signal_timeout(self.timeout_s)))
            except Exception:
                self.stats["verify_errors"] += 1
        self._equal[pair] = result
        return result

    def cluster(self, answers: Sequence[str | None]) -> Clustering:
        """Cluster one query's answers (None or blank = no answer); ids in first-seen order."""
        ids: list[int] = []
        reps: list[str | None] = []
        rep_keys: list[str | None] = []
        sizes: list[int] = []
        by_key: dict[str, int] = {}
        no_answer: int | None = None
        for answer in answers:
            key = normalise_answer(answer) if answer is not None else ""
            if not key:
                if no_answer is None:
                    no_answer = len(reps)
                    reps.append(None)
                    rep_keys.append(None)
                    sizes.append(0)
                cid = no_answer
            elif key in by_key:
                cid = by_key[key]
            else:
                cid = next((c for c, rep in enumerate(rep_keys) if rep is not None and self.equivalent(rep, key)), None)
                if cid is None:
                    cid = len(reps)
                    reps.append(answer)
                    rep_keys.append(key)
                    sizes.append(0)
                by_key[key] = cid
            ids.append(cid)
            sizes[cid] += 1
        return Clustering(ids, reps, sizes, no_answer)

    def matches_gold(self, gold: str, answer: str | None) -> bool:
        """Whether `answer` is equivalent to the gold answer (`math_reward`), cached by (gold, normalised answer)."""
        if answer is None or not normalise_answer(answer):
            return False
        pair = (gold, normalise_answer(answer))
        if pair in self._graded:
            self.stats["grade_cache_hits"] += 1
        else:
            self.stats["grade_calls"] += 1
            self._graded[pair] = math_reward(gold, f"\\boxed{{{answer}}}", timeout_s=self.timeout_s).reward == 1.0
        return self._graded[pair]
