"""Worker for test_fsdp2.py (run under torchrun, 2 gloo processes on CPU): a model whose loss head is
fastft.nn.LinearCrossEntropyLoss, sharded with FSDP2 (fully_shard), must give the same loss and
gradients as the unsharded model on the same global batch."""
import copy
import os
import sys

import torch
from torch import nn

from fastft.nn.linear_cross_entropy import LinearCrossEntropyLoss
from gloo_workers import worker_main

try:
    from torch.distributed.fsdp import fully_shard
except ImportError:  # torch < 2.6
    from torch.distributed._composable.fsdp import fully_shard

HIDDEN, VOCAB, TOKENS = 24, 101, 37


class TinyLM(nn.Module):
    def __init__(self, freeze_head: bool):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(16, HIDDEN), nn.Tanh())
        self.head = LinearCrossEntropyLoss(HIDDEN, VOCAB, bias=True, label_smoothing=0.05, chunk_size=8)
        if freeze_head:  # LoRA-style: the head's weight is frozen, its bias still trains
            self.head.linear.weight.requires_grad_(False)

    def forward(self, x, target):
        return self.head(self.body(x), target)


def batch(rank: int):
    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(TOKENS, 16, generator=g)
    t = torch.randint(0, VOCAB, (TOKENS,), generator=g)
    t[::5] = -100
    return x, t


def check(freeze_head: bool, rank: int, world: int) -> None:
    torch.manual_seed(0)
    model = TinyLM(freeze_head)
    reference = copy.deepcopy(model)
    fully_shard(model.head)
    fully_shard(model.body)
    fully_shard(model)

    x, t = batch(rank)
    loss = model(x, t)
    loss.backward()

    # Reference: the unsharded model on the whole global batch; FSDP averages gradients over ranks.
    ref_losses = [reference(*batch(r)) for r in range(world)]
    (sum(ref_losses) / world).backward()
    torch.testing.assert_close(loss.detach(), ref_losses[rank].detach(), rtol=1e-5, atol=1e-6)
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        if q.grad is None:
            assert p.grad is None, name
            continue
        grad = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        torch.testing.assert_close(grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(worker_main([lambda rank, world: check(False, rank, world),
                          lambda rank, world: check(True, rank, world)], "FSDP2_LINEAR_CROSS_ENTROPY_OK"))
