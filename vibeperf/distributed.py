"""torchrun + FSDP2 helpers for the trainers; every function is a no-op (or the plain single-process path) when the
process was not started by torchrun.

- `init_distributed()` reads RANK / WORLD_SIZE / LOCAL_RANK from torchrun's environment and starts the default
  process group: NCCL on CUDA (one GPU per local rank), gloo on the CPU.
- `shard_model(model, mp_policy)` applies `fully_shard` to each transformer block (`model.model.layers[i]`), then to
  a `FusedLossLM` root that wraps the whole causal LM; the root group holds the embeddings, final norm and LM head.
  Reduce-scatter sums (divide factor 1, plain SUM: gloo has no PREMUL_SUM): the loss is already divided by the
  global loss-token count.
- LM head and the fused loss: the loss kernel takes `lm_head.weight` directly, outside the HF module's forward, so
  the loss is computed inside `vibeperf.model.FusedLossLM.forward`, the FSDP root (see vibeperf.model.fused for
  why). The alternative (each rank keeps a vocabulary shard and the kernel's log-sum-exp pieces are all-reduced)
  saves the head all-gather but needs a vocab-parallel kernel; not done.
- `global_loss_tokens(n)`: all-reduce (SUM) of the step's loss-token count on the device, before the micro-batches.
- `to_full(t)`: the full value of a DTensor (e.g. the grad norm `vibeperf.train.clip_gradients` returns).
- `save_sharded` / `load_sharded`: `torch.distributed.checkpoint` of model + optimizer (`get_state_dict` /
  `set_state_dict`), loadable by any number of processes, including one without a process group.
  `export_full(model, path)`: gathers the full state dict and writes the Hugging Face checkpoint from rank 0.
- `full_tensor_buckets(model, bucket_bytes)`: the full weights, gathered bucket by bucket, for the weight push to a
  rollout engine (`RolloutEngine.update_weights_bucketed`): never the whole unsharded model at once.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from vibeperf.model.fused import FusedLossLM

_OWNED = False  # whether init_distributed started the process group (destroy_distributed ends only that one)


def is_distributed() -> bool:
    """True when the default process group is initialised (by `init_distributed` under torchrun, or by the caller)."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ


def init_distributed(device_type: str | None = None) -> torch.device | None:
    """Start the process group from torchrun's environment; returns this rank's device, or None without torchrun."""
    if not launched_by_torchrun():
        return None
    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    local = int(os.environ["LOCAL_RANK"])
    if device_type == "cuda":
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        global _OWNED
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
        _OWNED = True
    return device


def destroy_distributed() -> None:
    """End the process group if `init_distributed` started it; a group the caller started is left to the caller
    (who may run several trainers in it: re-creating a group in one torchrun launch reuses its store keys)."""
    global _OWNED
    if is_distributed() and _OWNED:
        dist.destroy_process_group()
        _OWNED = False


def default_mp_policy(device: torch.device):
    """bf16 parameters and compute with fp32 gradient reduction on CUDA; None (full fp32) on the CPU."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if device.type != "cuda":
        return None
    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def shard_model(model: nn.Module, mp_policy=None) -> FusedLossLM:
    """fully_shard each block of `model.model.layers`, then the `FusedLossLM` root; returns the root.

    `model` keeps working as the HF module (its parameters become DTensor shards); train through the returned root.
    """
    from torch.distributed.fsdp import FSDPModule, fully_shard

    kw = {"mp_policy": mp_policy} if mp_policy is not None else {}
    body = getattr(model, model.base_model_prefix)
    for layer in body.layers:
        fully_shard(layer, **kw)
    root = fully_shard(FusedLossLM(model), **kw)
    for m in root.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)
    return root


def global_loss_tokens(n_local: torch.Tensor) -> torch.Tensor:
    """The loss-token count summed over ranks (an all-reduce on the device; no host sync); identity alone."""
    if not is_distributed():
        return n_local
    n = n_local.clone()
    dist.all_reduce(n, op=dist.ReduceOp.SUM)
    return n


def all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """A reduced copy of `t` over every process ("sum" or "max"; on the device, no host sync); `t` itself alone."""
    if not is_distributed():
        return t
    t = t.clone()
    dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
    return t


def gather_lists(local: dict[str, list]) -> dict[str, list]:
    """Each key's host list concatenated over processes in rank order (`all_gather_object`); `local` itself alone."""
    if not is_distributed():
        return local
    parts: list = [None] * world_size()
    dist.all_gather_object(parts, local)
    return {k: [x for p in parts for x in p[k]] for k in local}


def rank_rows(rows: Sequence, r: int | None = None, world: int | None = None) -> list[tuple[object, bool]]:
    """This rank's micro-batches: rows r, r + world, ...; every rank gets the same count (FSDP's collectives must
    match), padded with a zero-weight copy of a row. Returns (row, real) pairs."""
    r = rank() if r is None else r
    world = world_size() if world is None else world
    per_rank = -(-len(rows) // world)
    mine = list(rows[r::world])
    return [(row, True) for row in mine] + [(rows[0], False)] * (per_rank - len(mine))


def to_full(t: torch.Tensor) -> torch.Tensor:
    """The full value of a DTensor (a collective), the tensor itself otherwise."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def save_sharded(path: Path | str, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """DCP checkpoint of model + optimizer under `path` (every rank writes its shards; a collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, optimizer)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=os.fspath(path))


def load_sharded(path: Path | str, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load a `save_sharded` checkpoint into `model` / `optimizer`, resharded to the current number of processes.

    The optimizer must already hold its state tensors (one step taken, or `optimizer` freshly built and initialised
    by `get_state_dict`, which does so)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    msd, osd = get_state_dict(model, optimizer)
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=os.fspath(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def full_tensor_buckets(model: nn.Module, bucket_bytes: int = 256 * 2**20) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """The full (unsharded) state dict of `model` (Hugging Face names), one bucket at a time: each bucket holds
    parameters whose full sizes add up to at most `bucket_bytes` (a larger tensor is a bucket of its own), gathered
    (`DTensor.full_tensor()`, one all-gather per parameter) only when the bucket is reached; at most one bucket's
    full tensors exist at once if the consumer drops them before asking for the next. A collective under FSDP:
    every rank must walk all buckets in the same order. Tied weights (`lm_head.weight` of an embedding-tied model)
    appear under each name, gathered once per name."""
    bucket, size = [], 0
    for name, t in model.state_dict().items():
        nbytes = t.numel() * t.element_size()
        if bucket and size + nbytes > bucket_bytes:
            yield [(n, to_full(x).detach()) for n, x in bucket]
            bucket, size = [], 0
        bucket.append((name, t))
        size += nbytes
    if bucket:
        yield [(n, to_full(x).detach()) for n, x in bucket]


def full_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Name -> full (global) shape of every state-dict tensor; no communication (a DTensor knows its global shape)."""
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def export_full(model: nn.Module, path: Path | str, tokenizer=None) -> None:
    """Gather the full state dict (a collective, offloaded to the CPU) and write the HF checkpoint from rank 0."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank() == 0:
        model.save_pretrained(path, state_dict=sd, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(path)
    if is_distributed():
        dist.barrier()
