"""B4's TRL baseline: `trl.SFTTrainer` with `padding_free=True` and `use_liger_kernel=True` on B4's samples.

`run_trl(model, steps_samples, opts)` trains the given model (fresh, same seed as the other methods) through TRL's
own loop on the samples of B4's steps in order (sequential sampler), one optimizer step per B4 step: micro-batches
of `opts.trl_batch` samples flattened into one padding-free row (TRL's collator: position ids restarting per
sample, cu_seq_lens for varlen kernels, the first token of each sample unlabelled), gradient accumulation over the
step, bf16 autocast over fp32 weights (`bf16=True`), gradient checkpointing, fused AdamW, lr 0 (weights stay equal),
grad clipping 1.0 (`checkpointing=False`: TRL without gradient checkpointing, the stronger baseline where the
activations fit). Attention: `opts.trl_attention` ("vibeperf" = the same varlen_attn kernels our packed path uses,
registered with transformers; "sdpa" = transformers' SDPA with its packed-sequence mask from position ids).
Timing: wall clock of steps 2.. (a callback synchronises at step begin/end); the loss of step 1 is TRL's logged loss.
Returns a dict (loss_first_step, seconds of the timed steps, peak GiB, settings) or raises RuntimeError with the
reason TRL could not run.
"""

from __future__ import annotations

import importlib.util
import tempfile
import time


def trl_available() -> tuple[bool, str]:
    """(whether trl imports here, why not)."""
    for name in ("trl", "datasets", "accelerate"):
        if importlib.util.find_spec(name) is None:
            return False, f"{name} is not installed"
    return True, ""


def run_trl(model, steps_samples, *, batch: int, attention: str, liger: bool, tokenizer_path: str,
            checkpointing: bool = True) -> dict:
    import torch
    from datasets import Dataset
    from torch.utils.data import SequentialSampler
    from transformers import AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from vibeperf.model import use_varlen_attention

    per_step = len(steps_samples[0])
    if per_step % batch:
        raise RuntimeError(f"--trl-batch {batch} must divide --samples {per_step}")
    flat = [s for st in steps_samples for s in st]
    ds = Dataset.from_dict({"input_ids": [s.input_ids.tolist() for s in flat],
                            "labels": [s.labels().tolist() for s in flat]})  # fmt: skip
    if attention == "vibeperf":
        use_varlen_attention(model, "auto")
    else:
        model.set_attn_implementation("sdpa")
    cuda = next(model.parameters()).is_cuda
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    class Timer(TrainerCallback):
        def __init__(self):
            self.begin, self.times, self.losses = None, [], []

        def on_step_begin(self, args, state, control, **kw):
            sync()
            self.begin = time.perf_counter()
            if state.global_step == 1 and cuda:
                torch.cuda.reset_peak_memory_stats()

        def on_step_end(self, args, state, control, **kw):
            sync()
            self.times.append(time.perf_counter() - self.begin)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

    class Sequential(SFTTrainer):
        """The same samples in the same order as the other methods (no shuffling)."""

        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

    timer = Timer()
    with tempfile.TemporaryDirectory() as out:
        args = SFTConfig(output_dir=out, padding_free=True, use_liger_kernel=liger, max_length=None,
                         per_device_train_batch_size=batch, gradient_accumulation_steps=per_step // batch,
                         max_steps=len(steps_samples), learning_rate=0.0, lr_scheduler_type="constant",
                         max_grad_norm=1.0, bf16=cuda, gradient_checkpointing=checkpointing,
                         gradient_checkpointing_kwargs={"use_reentrant": False},
                         optim="adamw_torch_fused" if cuda else "adamw_torch", logging_steps=1, save_strategy="no",
                         report_to="none", dataloader_num_workers=0, seed=0, disable_tqdm=True,
                         use_cpu=not cuda)  # fmt: skip
        trainer = Sequential(model=model, args=args, train_dataset=ds, callbacks=[timer],
                             processing_class=AutoTokenizer.from_pretrained(tokenizer_path))  # fmt: skip
        trainer.train()
    if len(timer.times) != len(steps_samples) or not timer.losses:
        raise RuntimeError(f"TRL ran {len(timer.times)} of {len(steps_samples)} steps, logged {len(timer.losses)}")
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    return {"loss_first_step": timer.losses[0], "seconds": sum(timer.times[1:]), "peak_gib": peak,
            "trl_batch": batch, "attention": attention, "liger": liger, "checkpointing": checkpointing}  # fmt: skip
