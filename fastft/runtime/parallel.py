"""Process group, parallel wrapping and activation checkpointing, all on torch's own engines.

ddp    DistributedDataParallel.
zero1  DDP + ZeroRedundancyOptimizer (optimizer state sharded).
zero2  FSDP2 ``fully_shard`` per decoder block, reshard_after_forward=False (parameters stay gathered
       between forward and backward: gradients and optimizer state sharded).
fsdp2  the same with reshard_after_forward=True (parameters sharded too).
hsdp   FSDP2 on a 2-D (replicate, shard) device mesh.
The final norm, lm_head and the loss (computed inside lm_head's call by the fused head) form one
FSDP unit; the root unit holds the embeddings. One process: the model is not wrapped.
"""
from __future__ import annotations

import datetime
import functools
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..tuners.base import unwrap
from .models import transformer_blocks

FSDP_MODES = ("zero2", "fsdp2", "hsdp")


@dataclass
class Dist:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def is_rank0(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return dist.is_available() and dist.is_initialized()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(mode: str) -> Dist:
    """Joins the process group torchrun set up (nccl on CUDA, gloo on CPU). A single process gets a
    one-member group only when the mode needs one (ZeRO / FSDP). Idempotent."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    needs_group = world > 1 or mode in ("zero1",) + FSDP_MODES
    if needs_group and not dist.is_initialized():
        if world == 1 and "MASTER_ADDR" not in os.environ:
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", WORLD_SIZE="1")
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=30),
                                device_id=device if cuda else None)
    return Dist(rank, world, local_rank, device)


def compile_blocks(model: nn.Module) -> int:
    """torch.compile of each decoder block's forward, in place (regional compilation, as torchtitan
    does: the blocks share code, so compile time stays that of a block or two, not of the whole model).
    Applied after activation checkpointing (the checkpoint is traced inside) and before DDP / FSDP2
    wrapping (FSDP2's per-block hooks run around it). Returns the blocks compiled."""
    blocks = transformer_blocks(model)
    for block in blocks:
        block.compile()
    return len(blocks)


def apply_activation_checkpointing(model: nn.Module, mode: str, every_k: int) -> int:
    """Non-reentrant checkpointing of the decoder blocks' forwards (none | full | every_k | offload).
    The block's own forward is wrapped in place, so parameter names (checkpoints, adapters) do not
    change. offload: the blocks' saved activations go to (pinned) CPU memory. Returns blocks wrapped."""
    if mode == "none":
        return 0
    blocks = transformer_blocks(model)
    chosen = blocks if mode in ("full", "offload") else blocks[::every_k]
    for block in chosen:
        inner = block.forward
        if mode == "offload":
            block.forward = functools.partial(_offloaded, inner)
        else:
            block.forward = functools.partial(_checkpointed, inner)
    return len(chosen)


def _checkpointed(inner, *args, **kwargs):
    from torch.utils.checkpoint import checkpoint

    return checkpoint(inner, *args, use_reentrant=False, **kwargs)


def _offloaded(inner, *args, **kwargs):
    with torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available()):
        return inner(*args, **kwargs)


def _head_unit(model: nn.Module) -> list:
    """[final norm, lm_head] when the head is not tied to the embeddings (a tied head stays in the root
    unit with the embedding it shares)."""
    base = unwrap(model)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if head is None or getattr(getattr(base, "config", None), "tie_word_embeddings", False):
        return []
    inner = getattr(base, "model", None)
    norm = getattr(inner, "norm", None)
    return [m for m in (norm, head) if m is not None]


def wrap(model: nn.Module, cfg, d: Dist) -> nn.Module:
    """The model wrapped for ``parallel.mode`` (on ``d.device``). Trainable parameters are moved to
    fp32 before sharding, so adapters keep an fp32 master copy under every mode."""
    mode = cfg.parallel.mode
    model.to(d.device)
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    if not d.active or d.world == 1 and mode in ("ddp",):
        return model
    if mode in ("ddp", "zero1"):
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model, device_ids=[d.device.index] if d.device.type == "cuda" else None)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if mode == "hsdp":
        replicate = cfg.parallel.hsdp_replicate or (2 if d.world % 2 == 0 else 1)
        if d.world % replicate:
            raise ValueError(f"parallel.hsdp_replicate = {replicate} does not divide the world size {d.world}")
        mesh = init_device_mesh(d.device.type, (replicate, d.world // replicate), mesh_dim_names=("replicate", "shard"))
    else:
        mesh = init_device_mesh(d.device.type, (d.world,))
    kwargs = {"mesh": mesh}
    if cfg.precision.impl == "fsdp" and cfg.precision.dtype != "fp32":
        low = torch.bfloat16 if cfg.precision.dtype == "bf16" else torch.float16
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=low, reduce_dtype=torch.float32)
    reshard = mode != "zero2"
    for block in transformer_blocks(model):
        fully_shard(block, reshard_after_forward=reshard, **kwargs)
    head = _head_unit(model)
    if head:
        fully_shard(head, reshard_after_forward=reshard, **kwargs)
    fully_shard(model, reshard_after_forward=reshard, **kwargs)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") and isinstance(model, nn.parallel.DistributedDataParallel) else model


def all_reduce_sum(value: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.active and d.world > 1:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def all_reduce_max(value: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.active and d.world > 1:
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return value


def barrier(d: Dist) -> None:
    if d.active and d.world > 1:
        dist.barrier()
