"""Worker for test_fsdp2.py (torchrun, 2 gloo processes on CPU): fastft.rl.token_logprobs computed by
call_with_fused_head inside an FSDP2-sharded causal LM's forward (fully_shard per decoder layer and the root,
so the head's weight is a shard outside the forward) gives the unsharded model's log-probs and, averaged
over ranks as FSDP does, its gradients: a fully trained Llama (the sharded head weight gets its gradient)
and a PEFT-LoRA'd one with LoRA on the head."""
import copy
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "integrations"))

from gloo_workers import worker_main  # noqa: E402
from patch_models import tiny_model, with_peft_lora  # noqa: E402

from fastft import rl  # noqa: E402
from fastft.integrations.fused_head import call_with_fused_head  # noqa: E402

try:
    from torch.distributed.fsdp import fully_shard
except ImportError:  # torch < 2.6
    from torch.distributed._composable.fsdp import fully_shard


def logprobs(model, ids):
    targets = ids[:, 1:]
    return call_with_fused_head(model, lambda head: rl.token_logprobs(head.input[:, :-1], head.weight, targets,
                                                                      bias=head.bias, temperature=0.8),
                                input_ids=ids)


def build(lora_head: bool):
    model = tiny_model("llama", tie_word_embeddings=False)
    return with_peft_lora(model, ["q_proj", "lm_head"], std=0.1) if lora_head else model


def check(lora_head: bool, rank: int, world: int) -> None:
    model = build(lora_head)
    reference = copy.deepcopy(model)
    base = model.get_base_model() if lora_head else model
    for layer in base.model.layers:
        fully_shard(layer)
    fully_shard(model)
    head = base.get_output_embeddings()
    weight = head.base_layer.weight if lora_head else head.weight
    assert hasattr(weight, "full_tensor"), "the head's weight should be an FSDP2 shard outside the forward"

    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, 128, (2 * world, 10), generator=g)
    scale = torch.linspace(0.5, 1.5, 9)
    logp = logprobs(model, ids[rank::world])
    (logp * scale).sum().backward()
    ref = [logprobs(reference, ids[r::world]) for r in range(world)]
    (sum((lp * scale).sum() for lp in ref) / world).backward()
    torch.testing.assert_close(logp.detach(), ref[rank].detach(), rtol=1e-5, atol=1e-5)
    checked = 0
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        if not q.requires_grad:
            continue
        grad = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        torch.testing.assert_close(grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)
        checked += 1
    assert checked >= 4, checked


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(worker_main([lambda rank, world: check(False, rank, world),
                          lambda rank, world: check(True, rank, world)], "FSDP2_FUSED_HEAD_OK"))
