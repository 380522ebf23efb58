"""fastft.patch on FSDP2-sharded PEFT models: 2 gloo processes on CPU via torchrun, one launch for Llama and
Gemma-2 (see fsdp2_patch_worker.py)."""
from pathlib import Path

import pytest

from gloo_workers import needs_gloo, run_worker

pytest.importorskip("peft")
WORKER = Path(__file__).with_name("fsdp2_patch_worker.py")


@pytest.mark.slow
@pytest.mark.skipif(needs_gloo, reason="needs torch.distributed with gloo")
def test_patched_fsdp2_lora_training_matches_unsharded_stock():
    run_worker(WORKER, "FSDP2_PATCH_OK", timeout=300)
