"""Run by test_distributed.py under `torchrun --nproc_per_node 2` (gloo, CPU): every parallel mode on the
same tiny run, early stopping, a checkpoint for the 2 -> 1 reshard; results saved for the test to compare."""
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


def record(name: str, cfg, **extra) -> None:
    """Train ``cfg``, keep its trained parameters and per-step losses and grad norms under ``name`` (plus
    ``extra(trainer)`` values), then free the trainer before the next one."""
    trainer = Trainer(cfg)
    trainer.fit()
    results[name] = {"params": trainable_state(trainer), "losses": [r["loss"] for r in trainer.history],
                     "grad_norms": [r["grad_norm"] for r in trainer.history],
                     **{key: fn(trainer) for key, fn in extra.items()}}
    trainer.close()


for mode in ("ddp", "zero1", "zero2", "fsdp2", "hsdp"):
    record(mode, tiny_config(work / mode, data, parallel={"mode": mode}, checkpoint={"at_end": True},
                             run={"export_methods": mode in ("ddp", "fsdp2")}))
# embeddings tied to the head (both frozen): the checkpoint holds neither
record("tied_fsdp2", tiny_config(work / "tied_fsdp2", data, parallel={"mode": "fsdp2"}, model={"tie_embeddings": True},
                                 checkpoint={"at_end": True}))
# FSDP2 over torch.compile'd blocks (regional compilation before fully_shard, as torchtitan)
record("fsdp2_compiled", tiny_config(work / "fsdp2_compiled", data, parallel={"mode": "fsdp2"},
                                     compile={"enabled": True}))
# every parameter-efficient method at once (LoRA, prefix, bottleneck adapters), sharded and replicated
for mode in ("ddp", "fsdp2"):
    record(f"methods_{mode}", tiny_config(work / f"methods_{mode}", data, parallel={"mode": mode}, **METHODS))
# bf16 frozen base and fp32 LoRA in the same FSDP2 units, bf16 autocast
record("mixed_fsdp2", tiny_config(work / "mixed_fsdp2", data, parallel={"mode": "fsdp2"}, **MIXED),
       dtypes=lambda t: sorted({str(p.dtype) for p in t.model.parameters()}))
record("groups_zero1", tiny_config(work / "groups_zero1", data, parallel={"mode": "zero1"}, data={"task": "two_rates"}))


class RankSkewedEval(Callback):
    """Rank 1 alone sees its eval metric worsen: without agreement the ranks would stop apart (and hang)."""

    def on_eval(self, trainer, step, metrics):
        if trainer.d.rank == 1:
            metrics["loss"] = float(step)


cfg = tiny_config(work / "early", data, run={"max_steps": 8, "export_methods": False},
                  eval={"every": 1, "early_stopping_patience": 2, "metric": "loss"}, data={"eval_path": str(data)})
trainer = Trainer(cfg, callbacks=[RankSkewedEval()])
trainer.fit()
results["early_stop_step"] = trainer.step
if rank == 0:
    torch.save(results, work / "results_rank0.pt")
else:
    torch.save({"early_stop_step": trainer.step}, work / "results_rank1.pt")
dist.barrier()
trainer.close()  # its FSDP / DDP state freed before the group ends (see Trainer.close)
dist.destroy_process_group()
print("RUNTIME_DIST_OK")
