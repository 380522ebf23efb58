"""Run by test_distributed.py under `torchrun --nproc_per_node 2` (gloo, CPU): every parallel mode on the
same tiny run, early stopping, a checkpoint for the 2 -> 1 reshard; results saved for the test to compare."""
import gc
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).absolute().parent))
from helpers import METHODS, MIXED, tiny_config, trainable_state  # noqa: E402

from fastft.runtime.trainer import Callback, Trainer  # noqa: E402

work, data = Path(sys.argv[1]), Path(sys.argv[2])
rank = int(os.environ["RANK"])
results = {}
for mode in ("ddp", "zero1", "zero2", "fsdp2", "hsdp"):
    cfg = tiny_config(work / mode, data, parallel={"mode": mode}, checkpoint={"at_end": mode == "fsdp2"},
                      run={"export_adapter": mode in ("ddp", "fsdp2")})
    trainer = Trainer(cfg)
    trainer.fit()
    results[mode] = {"params": trainable_state(trainer), "losses": [r["loss"] for r in trainer.history],
                     "grad_norms": [r["grad_norm"] for r in trainer.history]}

# FSDP2 over torch.compile'd blocks (regional compilation before fully_shard, as torchtitan)
trainer = Trainer(tiny_config(work / "fsdp2_compiled", data, parallel={"mode": "fsdp2"}, compile={"enabled": True}))
trainer.fit()
results["fsdp2_compiled"] = {"params": trainable_state(trainer), "losses": [r["loss"] for r in trainer.history],
                             "grad_norms": [r["grad_norm"] for r in trainer.history]}

# every parameter-efficient method at once (LoRA, prefix, bottleneck adapters), sharded and replicated
for mode in ("ddp", "fsdp2"):
    trainer = Trainer(tiny_config(work / f"methods_{mode}", data, parallel={"mode": mode}, **METHODS))
    trainer.fit()
    results[f"methods_{mode}"] = {"params": trainable_state(trainer), "losses": [r["loss"] for r in trainer.history]}

# bf16 frozen base and fp32 LoRA in the same FSDP2 units, bf16 autocast
trainer = Trainer(tiny_config(work / "mixed_fsdp2", data, parallel={"mode": "fsdp2"}, **MIXED))
trainer.fit()
results["mixed_fsdp2"] = {"params": trainable_state(trainer), "losses": [r["loss"] for r in trainer.history],
                          "dtypes": sorted({str(p.dtype) for p in trainer.model.parameters()})}

trainer = Trainer(tiny_config(work / "groups_zero1", data, parallel={"mode": "zero1"}, data={"task": "two_rates"}))
trainer.fit()
results["groups_zero1"] = {"params": trainable_state(trainer), "losses": [r["loss"] for r in trainer.history]}


class RankSkewedEval(Callback):
    """Rank 1 alone sees its eval metric worsen: without agreement the ranks would stop apart (and hang)."""

    def on_eval(self, trainer, step, metrics):
        if trainer.d.rank == 1:
            metrics["loss"] = float(step)


cfg = tiny_config(work / "early", data, run={"max_steps": 8, "export_adapter": False},
                  eval={"every": 1, "early_stopping_patience": 2, "metric": "loss"}, data={"eval_path": str(data)})
trainer = Trainer(cfg, callbacks=[RankSkewedEval()])
trainer.fit()
results["early_stop_step"] = trainer.step
if rank == 0:
    torch.save(results, work / "results_rank0.pt")
else:
    torch.save({"early_stop_step": trainer.step}, work / "results_rank1.pt")
dist.barrier()
trainer.close()  # the last trainer's FSDP / DDP state freed before the group ends (see Trainer.close)
del trainer
gc.collect()
dist.destroy_process_group()
print("RUNTIME_DIST_OK")
