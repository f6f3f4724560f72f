"""The prompts of CLR inference: candidate, claim extraction and claim verification, and the verdict label tokens.

Every prompt is a single user turn put through the model's chat template (`RolloutEngine.chat_prompt`); the same
model answers all three.

Candidate (K samples per query): the query, a blank line, then `CandidateConfig.instruction` (default "Please reason
step by step, and put your final answer within \\boxed{}.").

Extraction (one per candidate, greedy by default), `EXTRACTION_TEMPLATE` with M = `num_claims`:

    Below is a problem and a solution to it. List the {M} claims in the solution that its final answer depends on
    most: intermediate results, computations or facts that can each be checked on their own.
    Write each claim as one self-contained sentence on its own line, numbered 1 to {M}, and write nothing else.

    Problem:
    {question}

    Solution:
    {solution}

The solution is the candidate's text; one longer than `max_chars` keeps its last `max_chars` characters (the part
nearest the answer) after a "[...]" marker. `vibeperf.clr.parse.parse_claims` reads the reply.

Verification (one per claim), `VERIFICATION_TEMPLATE`:

    Problem:
    {question}

    Claim about a step of its solution:
    {claim}

    Is the claim correct? Answer with one word: true or false.

A binary verdict parses the reply (`vibeperf.clr.parse.parse_verdict`); a probability verdict reads the model's
next-token distribution right after the generation prompt plus `VerificationConfig.answer_prefix` (see
`label_token_ids`).
"""

from __future__ import annotations

DEFAULT_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."

EXTRACTION_TEMPLATE = (
    "Below is a problem and a solution to it. List the {num_claims} claims in the solution that its final answer "
    "depends on most: intermediate results, computations or facts that can each be checked on their own.\n"
    "Write each claim as one self-contained sentence on its own line, numbered 1 to {num_claims}, and write nothing "
    "else.\n\nProblem:\n{question}\n\nSolution:\n{solution}"
)

VERIFICATION_TEMPLATE = (
    "Problem:\n{question}\n\nClaim about a step of its solution:\n{claim}\n\n"
    "Is the claim correct? Answer with one word: true or false."
)

CLIP_MARKER = "[...] "
TRUE_WORDS = ("true", "True", "TRUE", " true", " True", " TRUE")
FALSE_WORDS = ("false", "False", "FALSE", " false", " False", " FALSE")


def candidate_prompt(question: str, instruction: str = DEFAULT_INSTRUCTION) -> str:
    """The user turn that asks for a candidate solution."""
    return f"{question}\n\n{instruction}" if instruction else question


def clip_solution(solution: str, max_chars: int) -> tuple[str, bool]:
    """The last `max_chars` characters of `solution` behind a "[...]" marker when it is longer; and whether it was."""
    if len(solution) <= max_chars:
        return solution, False
    return CLIP_MARKER + solution[len(solution) - max_chars :], True


def extraction_prompt(question: str, solution: str, num_claims: int) -> str:
    """The user turn asking for the `num_claims` decision-relevant claims of `solution` (already clipped)."""
    return EXTRACTION_TEMPLATE.format(num_claims=num_claims, question=question, solution=solution)


def verification_prompt(question: str, claim: str) -> str:
    """The user turn asking whether `claim` (about a solution of `question`) is correct."""
    return VERIFICATION_TEMPLATE.format(question=question, claim=claim)


def label_token_ids(tokenizer) -> tuple[list[int], list[int]]:
    """Token ids whose next-token probability counts as "true" and as "false" in probability verdicts.

    For each label, its spellings (`TRUE_WORDS`, `FALSE_WORDS`: lower, title and upper case, with and without a
    leading space) that are one token; when no spelling of a label is one token (small vocabularies), the first token
    of each spelling. An id in both sets is dropped from both. The verdict is p(true) / (p(true) + p(false)) summed
    over these ids, so mass on other tokens (a leading newline, "The") counts for neither side.
    """

    def ids(words):
        encoded = [tokenizer.encode(w, add_special_tokens=False) for w in words]
        single = {e[0] for e in encoded if len(e) == 1}
        return single or {e[0] for e in encoded if e}

    true_ids, false_ids = ids(TRUE_WORDS), ids(FALSE_WORDS)
    shared = true_ids & false_ids
    true_ids, false_ids = sorted(true_ids - shared), sorted(false_ids - shared)
    if not true_ids or not false_ids:
        raise ValueError("the tokenizer gives no token that tells 'true' from 'false'; use verification.mode=binary")
    return true_ids, false_ids
