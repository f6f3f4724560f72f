"""Reading model outputs for CLR: the final answer of a candidate, its claims, and a claim's verdict.

None of these raises on malformed text; each malformation has a defined fallback, named so that the pipeline can
count how often each was needed.

Final answer (`final_answer`): the content of the last `\\boxed{...}` after the reasoning, i.e. after the last
`</think>` when the text has one and a box follows it, else the last box of the whole text. Missing, unbalanced
(`\\boxed{\\frac{1}{`) or blank boxes give None, and so does a `<think>` that never closes (the reasoning ran out
of tokens: a box inside it is not a final answer); the candidate joins the "no answer" cluster.

Claims (`parse_claims`), from the extraction reply and the candidate's own text, exactly M of them:

1. Only the reply after its last `</think>` is read (a reasoning model thinks first); without think tags, all of it;
   after a `<think>` that never closes, nothing.
2. Items are the numbered lines ("1. ...", "2) ...", "(3) ...", "Claim 4: ...", "**Claim 5:** ..."); when there are
   none, the bullet lines ("- ...", "* ...", "• ...").
3. Each item is cleaned (markdown bold, quotes, spacing); junk (fewer than 2 letters or digits, or a placeholder
   such as "N/A", "none", "...") and repeats (case-insensitive) are dropped: fallback "claims_dropped", per item.
4. More than M items: the first M are kept ("truncated").
5. No usable item (none found, or all junk): sentence splitting of the candidate's text ("sentences"): its last M
   non-junk sentences, the ones nearest the answer, skipping those holding a `\\boxed{}` (they restate the answer,
   they do not support it).
6. Still fewer than M: the missing claims are padded as unverifiable ("padded"; "claims_padded" per claim). A
   padded claim is never sent to the judge and its verdict is 0.

Verdict (`parse_verdict`): in the reply after the reasoning (as for claims: nothing after an unclosed `<think>`), the
first whole word "true" or "false", any case: 1.0 or 0.0. Neither gives None, which the pipeline scores 0
(unverifiable) and counts as "verdict_unparsed".
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from vibeperf.rewards.math import last_boxed

_THINK_START, _THINK_END = "<think>", "</think>"
_NUMBERED = re.compile(
    r"^\s*(?:[-*•]\s+)?(?:\*\*)?(?:claim\s*)?[(\[]?\d{1,2}\s*[.):\]](?:\*\*)?\s+(?P<body>\S.*)$", re.IGNORECASE
)
_BULLET = re.compile(r"^\s*[-*•]\s+(?P<body>\S.*)$")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")
_VERDICT = re.compile(r"\b(true|false)\b", re.IGNORECASE)
_PLACEHOLDERS = {"n/a", "na", "none", "null", "tbd", "claim", "..."}
MIN_ALNUM = 2


@dataclass
class ExtractedClaims:
    """The M claims of one candidate (None = a padded, unverifiable claim) and how they were obtained."""

    claims: list[str | None]
    source: str
    """"list" (from the extraction reply) or "sentences" (fallback: the candidate's own sentences)."""
    fallbacks: dict[str, int] = field(default_factory=dict)
    """Fallbacks used: truncated, sentences, padded (1 each), claims_dropped, claims_padded (per claim)."""


def after_reasoning(text: str) -> str:
    """The part of `text` after its last `</think>`; all of it without think tags; "" when a `<think>` never closes."""
    head, sep, tail = text.rpartition(_THINK_END)
    if sep:
        return tail
    return "" if _THINK_START in text else text


def final_answer(text: str) -> str | None:
    """The last `\\boxed{}` content after the reasoning (see the module docstring); None if missing or malformed."""
    if _THINK_END not in text and _THINK_START in text:
        return None
    for part in [after_reasoning(text), text] if _THINK_END in text else [text]:
        try:
            boxed = last_boxed(part)
        except ValueError:
            return None
        if boxed is not None:
            return boxed.strip() or None
    return None


def _clean(item: str) -> str:
    item = item.strip().strip("*").strip()
    item = re.sub(r"^claim\s*:\s*", "", item, flags=re.IGNORECASE)
    item = item.strip("\"'“”` ").strip()
    return " ".join(item.split())


def _is_junk(item: str) -> bool:
    return item.lower().strip(" .") in _PLACEHOLDERS or sum(ch.isalnum() for ch in item) < MIN_ALNUM


def _keep(items: list[str], dropped: list[int]) -> list[str]:
    """Cleaned, non-junk, first occurrences (case-insensitive); the number of others is added to `dropped`."""
    out, seen = [], set()
    for raw in items:
        item = _clean(raw)
        key = item.lower()
        if _is_junk(item) or key in seen:
            dropped[0] += 1
            continue
        seen.add(key)
        out.append(item)
    return out


def list_items(reply: str) -> list[str]:
    """The numbered lines of `reply` (their text only), else its bullet lines, in order, uncleaned."""
    lines = after_reasoning(reply).splitlines()
    for pattern in (_NUMBERED, _BULLET):
        items = [m["body"] for m in map(pattern.match, lines) if m]
        if items:
            return items
    return []


def split_sentences(text: str) -> list[str]:
    """Sentences of `text`: split after . ! ? followed by white space, and at line breaks; blank ones dropped."""
    return [s.strip() for s in _SENTENCE_END.split(text) if s and s.strip()]


def parse_claims(reply: str, solution: str, num_claims: int) -> ExtractedClaims:
    """Exactly `num_claims` claims from the extraction `reply`, falling back on `solution` (module docstring)."""
    if num_claims < 1:
        raise ValueError(f"num_claims must be >= 1, got {num_claims}")
    fallbacks: dict[str, int] = {}
    dropped = [0]
    claims = _keep(list_items(reply), dropped)
    source = "list"
    if not claims:
        source = "sentences"
        fallbacks["sentences"] = 1
        sentences = [s for s in split_sentences(solution) if "\\boxed" not in s and "\\fbox" not in s]
        claims = _keep(sentences, [0])[-num_claims:]
    if dropped[0]:
        fallbacks["claims_dropped"] = dropped[0]
    if len(claims) > num_claims:
        fallbacks["truncated"] = 1
        claims = claims[:num_claims]
    padded: list[str | None] = list(claims)
    if len(padded) < num_claims:
        fallbacks["padded"] = 1
        fallbacks["claims_padded"] = num_claims - len(padded)
        padded += [None] * (num_claims - len(padded))
    return ExtractedClaims(padded, source, fallbacks)


def parse_verdict(reply: str) -> float | None:
    """1.0 for "true", 0.0 for "false" (the first of the two words after the reasoning), None for neither."""
    match = _VERDICT.search(after_reasoning(reply))
    if match is None:
        return None
    return 1.0 if match[1].lower() == "true" else 0.0
