"""Multi-process checks on CPU: a pytest side that launches a worker script under torchrun (2 gloo processes)
and a worker side that runs its checks in the process group and prints a marker on success."""
from __future__ import annotations

import gc
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[2]
needs_gloo = not dist.is_available() or not dist.is_gloo_available()


def run_worker(worker: Path, marker: str, timeout: int = 180, nproc: int = 2) -> None:
    """Run ``worker`` under torchrun on ``nproc`` CPU processes; fail with its output unless it exits 0 and
    prints ``marker``."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.pop("FASTFT_BACKEND", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), str(worker)]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    assert marker in proc.stdout


def worker_main(checks: Iterable[Callable[[int, int], None]], marker: str) -> int:
    """In a torchrun process: join the gloo group, run each ``check(rank, world)``, print ``marker`` on rank 0."""
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    try:
        for check in checks:
            check(rank, world)
        dist.barrier()
    finally:
        gc.collect()  # FSDP2 state in reference cycles: freed now, not at interpreter exit (gloo aborts there)
        dist.destroy_process_group()
    if rank == 0:
        print(marker)
    return 0
