"""A tiny Qwen2-architecture checkpoint built locally, for tests and the demo.

`build_tiny_model(out_dir)` writes a directory that loads like any Hugging Face checkpoint
(`AutoModelForCausalLM.from_pretrained`, `AutoTokenizer.from_pretrained`, vLLM): a byte-level BPE tokenizer with
Qwen2's special tokens and a Qwen-style chat template, and a `Qwen2ForCausalLM` with random weights saved as fp32
safetensors. Nothing is downloaded.

- The tokenizer is trained on a fixed generated corpus (arithmetic word problems, small Python functions, chat
  sentences), so it is the same for every build; `seed` only sets the weights. Same arguments -> same files.
- The directory appears complete or not at all: it is built in a temporary sibling and renamed into place, with a
  marker file written last. An existing complete build with the same arguments is returned as is.
- `get_tiny_model()` builds the default model once into `tiny_model_dir()` (under `$VIBEPERF_CACHE`, else
  `~/.cache/vibeperf`), under a file lock so that parallel test processes build it once.
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import shutil
import uuid
from pathlib import Path

import torch

MARKER = ".vibeperf-tiny-model.json"
FORMAT_VERSION = 1
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
TOKENIZER_VOCAB_SIZE = 1024
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

_NAMES = ("Ada", "Ben", "Chen", "Dana", "Eli", "Fatima", "Gus", "Hana", "Ivan", "Jo", "Kemal", "Lea", "Maria", "Noah")
_ITEMS = ("apples", "books", "coins", "marbles", "pencils", "stickers", "cookies", "cards", "shells", "tickets")
_TOPICS = (
    "prime numbers,sorting,recursion,fractions,geometry,probability,loops,strings,dictionaries,binary search,"
    "dynamic programming,triangles,percentages,matrices,graphs"
).split(",")
_WORDS = (
    "the answer is correct because we first compute each value then check the result carefully and write it down "
    "this function returns a list of numbers where every element is greater than zero so the total stays positive "
    "please explain why the sum of two even numbers is always even while the product of odd numbers stays odd "
    "a student reads three chapters every week and finishes the whole book before the end of the month "
    "we can solve the equation by moving terms to one side factoring and testing small integer solutions "
    "energy speed distance time force mass velocity area volume circle square rectangle average median "
    "hypothesis experiment observation molecule electron gravity temperature pressure density wavelength "
    "algorithm variable constant parameter argument iterator generator exception recursion memory pointer "
    "tomorrow yesterday morning evening kitchen garden library museum station market bridge mountain river "
    "beautiful difficult important interesting possible different available necessary particular certain "
    "remember understand consider continue describe discover develop provide require suggest imagine believe "
    "quickly slowly usually probably actually especially finally exactly simply together almost already"
).split()
_CODE_BODIES = (
    "    return {x} + {y}",
    "    return [{x} * {n} for {x} in range({y})]",
    "    if {x} > {y}:\n        return {x}\n    return {y}",
    "    total = 0\n    for i in range({x}):\n        total += i * {n}\n    return total",
    "    return sum(1 for value in {x} if value % 2 == 0) + {y}",
    "    result = {{}}\n    for key, value in {x}.items():\n        result[key] = value + {y}\n    return result",
    "    while {x} > {n}:\n        {x} //= 2\n    return {x} + len(str({y}))",
    "    try:\n        return int({x}) // {y}\n    except (ValueError, ZeroDivisionError):\n        return None",
)


def _word_problem(rng: random.Random) -> str:
    name, other = rng.sample(_NAMES, 2)
    item = rng.choice(_ITEMS)
    a = rng.randint(2, 99)
    if rng.random() < 0.5:
        b = rng.randint(2, 99)
        verb, op, result = f"gets {b} more from {other}", "+", a + b
    else:
        b = rng.randint(1, a)
        verb, op, result = f"gives {b} to {other}", "-", a - b
    return (
        f"{name} has {a} {item} and {verb}. How many {item} does {name} have now? "
        f"{a} {op} {b} = {result}. The answer is \\boxed{{{result}}}."
    )


def _python_snippet(rng: random.Random) -> str:
    fn = rng.choice(("add", "total", "scale", "clip", "count_even", "square_sum", "merge_counts", "halve", "safe_div"))
    x, y, n = rng.choice(("a", "x", "items", "data")), rng.choice(("b", "n", "limit", "offset")), rng.randint(1, 20)
    body = rng.choice(_CODE_BODIES).format(x=x, y=y, n=n)
    return f"def {fn}({x}, {y}):\n{body}\n\n\nprint({fn}({n}, {rng.randint(0, 9)}))"


def _chat_line(rng: random.Random) -> str:
    topic = rng.choice(_TOPICS)
    opener = rng.choice(
        (
            f"Can you explain {topic} to me?",
            f"Hello, I need help with {topic}.",
            f"Thanks, that makes sense. What else should I know about {topic}?",
            f"Please write a short example about {topic}.",
        )
    )
    words = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(6, 16)))
    return f"{opener} Sure! Let's think step by step: {words}."


def _corpus(num_lines: int = 3000) -> list[str]:
    """Deterministic training text for the tokenizer (independent of the model seed)."""
    rng = random.Random(1234)
    makers = (_word_problem, _python_snippet, _chat_line)
    return [makers[i % 3](rng) for i in range(num_lines)]


def _build_tokenizer():
    """Train a byte-level BPE with Qwen2's pre-tokenizer; wrap it in Qwen2's tokenizer class, special tokens last."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE - len(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    bpe = json.loads(tok.to_str())["model"]
    vocab = {**bpe["vocab"], **{t: len(bpe["vocab"]) + i for i, t in enumerate(SPECIAL_TOKENS)}}
    return Qwen2Tokenizer(
        vocab=vocab,
        merges=[tuple(m) for m in bpe["merges"]],
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        additional_special_tokens=list(SPECIAL_TOKENS),
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )


def _write(
    tmp: Path,
    *,
    hidden_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    intermediate_size: int,
    vocab_size: int | None,
    max_position_embeddings: int,
    seed: int,
) -> None:
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    tokenizer = _build_tokenizer()
    tokenizer.model_max_length = max_position_embeddings
    vocab_size = len(tokenizer) if vocab_size is None else vocab_size
    if vocab_size < len(tokenizer):
        raise ValueError(f"vocab_size={vocab_size} is smaller than the tokenizer's {len(tokenizer)} tokens")
    eot, im_end = tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>"])
    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        max_window_layers=num_layers,
        tie_word_embeddings=False,
        bos_token_id=eot,
        eos_token_id=im_end,
        pad_token_id=eot,
        dtype="float32",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config).to(torch.float32)
    model.generation_config = GenerationConfig(bos_token_id=eot, eos_token_id=[im_end, eot], pad_token_id=eot)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)


def _is_complete(path: Path) -> bool:
    return (path / MARKER).is_file()


def _reuse(out_dir: Path, params: dict) -> bool:
    """True if `out_dir` is a complete build with `params`; ValueError if it is one with other arguments."""
    if not _is_complete(out_dir):
        return False
    found = json.loads((out_dir / MARKER).read_text())
    if found != params:
        diff = {k: (found.get(k), v) for k, v in params.items() if found.get(k) != v}
        raise ValueError(
            f"{out_dir} holds a tiny model built with other arguments (found, wanted): {diff}; "
            "pass overwrite=True to rebuild"
        )
    return True


def build_tiny_model(
    out_dir: str | os.PathLike,
    *,
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 256,
    vocab_size: int | None = None,
    max_position_embeddings: int = 4096,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Build a tiny random-weight Qwen2 checkpoint plus tokenizer into `out_dir` and return its path.

    `vocab_size=None` uses the tokenizer's size (1024); a larger value pads the embedding like Qwen's checkpoints.
    `head_dim = hidden_size // num_heads` (32 by default: vLLM's CPU attention rejects 16). If `out_dir` already
    holds a complete build, it is returned as is when it was built with the same arguments (unless `overwrite`),
    and a `ValueError` is raised when the arguments differ. A non-empty directory that is not a build is refused.
    """
    if hidden_size % num_heads or num_heads % num_kv_heads:
        raise ValueError(
            f"need hidden_size % num_heads == 0 and num_heads % num_kv_heads == 0, got {hidden_size=}, "
            f"{num_heads=}, {num_kv_heads=}"
        )
    out_dir = Path(out_dir)
    params = {
        "format": FORMAT_VERSION,
        "hidden_size": hidden_size,
        "num_layers": num_layers,
        "num_heads": num_heads,
        "num_kv_heads": num_kv_heads,
        "intermediate_size": intermediate_size,
        "vocab_size": vocab_size,
        "max_position_embeddings": max_position_embeddings,
        "seed": seed,
    }
    if not overwrite and _reuse(out_dir, params):
        return out_dir
    if not overwrite and out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} exists and is not a tiny-model build; pass overwrite=True to replace it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        _write(tmp, **{k: v for k, v in params.items() if k != "format"})
        (tmp / MARKER).write_text(json.dumps(params, indent=2, sort_keys=True) + "\n")
        if overwrite and out_dir.exists():
            old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            out_dir.rename(old)
            shutil.rmtree(old)
        try:
            tmp.rename(out_dir)
        except OSError:
            # Another process finished the same build first (rename cannot replace a non-empty directory).
            if not _reuse(out_dir, params):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def tiny_model_dir() -> Path:
    """Default location of the cached tiny model: `$VIBEPERF_CACHE/tiny-qwen2-v<N>` (else `~/.cache/vibeperf`)."""
    root = Path(os.environ.get("VIBEPERF_CACHE") or Path.home() / ".cache" / "vibeperf")
    return root / f"tiny-qwen2-v{FORMAT_VERSION}"


def get_tiny_model() -> Path:
    """Return `tiny_model_dir()`, building the default tiny model there on first use (safe across processes)."""
    path = tiny_model_dir()
    if _is_complete(path):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return build_tiny_model(path)
