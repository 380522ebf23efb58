"""Worker for test_patch_fsdp2.py (torchrun, 2 gloo processes on CPU): a PEFT-LoRA tiny model sharded with
FSDP2 (fully_shard per decoder layer and the root) and then fastft.patch'ed trains like the unsharded stock
model on the same global batch: 5 AdamW steps, losses and final adapter parameters. Llama (untied, LoRA on
lm_head too) and Gemma-2 (tied head, softcap)."""
import copy
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "distributed"))


import fastft  # noqa: E402
from gloo_workers import worker_main  # noqa: E402
from patch_models import batches, tiny_model, with_peft_lora  # noqa: E402

try:
    from torch.distributed.fsdp import fully_shard
except ImportError:  # torch < 2.6
    from torch.distributed._composable.fsdp import fully_shard

STEPS = 5


def lora_model(model_type):
    model = tiny_model(model_type)
    return with_peft_lora(model, ["q_proj", "v_proj", "down_proj", "lm_head"])


def check(model_type, rank, world):
    model = lora_model(model_type)
    reference = copy.deepcopy(model)
    for layer in model.get_base_model().model.layers:
        fully_shard(layer)
    fully_shard(model)
    handle = fastft.patch(model)
    assert handle.report.fused("loss") and len(handle.report.fused("lora")) == 7, str(handle.report)
    assert "FSDP2" in handle.report.fused("model")[-1].detail
    assert "LoRA'd head fused" in handle.report.fused("loss")[0].detail

    data = batches(STEPS, batch=2 * world)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3, eps=1e-6)
    ref_opt = torch.optim.AdamW([p for p in reference.parameters() if p.requires_grad], lr=3e-3, eps=1e-6)
    for ids, labels in data:
        opt.zero_grad(set_to_none=True)
        ref_opt.zero_grad(set_to_none=True)
        out = model(input_ids=ids[rank::world], labels=labels[rank::world])
        assert out.logits is None  # the fused head ran
        out.loss.backward()
        opt.step()
        # FSDP averages the ranks' gradients: the reference is the mean of the per-rank losses
        ref_losses = [reference(input_ids=ids[r::world], labels=labels[r::world]).loss for r in range(world)]
        (sum(ref_losses) / world).backward()
        ref_opt.step()
        torch.testing.assert_close(out.loss.detach(), ref_losses[rank].detach(), rtol=1e-4, atol=1e-6)
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        if q.requires_grad:
            full = p.full_tensor() if hasattr(p, "full_tensor") else p
            torch.testing.assert_close(full.detach(), q.detach(), rtol=1e-3, atol=1e-4, msg=name)
    handle.undo()


if __name__ == "__main__":
    sys.exit(worker_main([lambda rank, world, t=model_type: check(t, rank, world) for model_type in ("llama", "gemma2")],
                         "FSDP2_PATCH_OK"))
