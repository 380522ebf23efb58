"""fastft under FSDP2, 2 gloo processes on CPU via torchrun (< 60 s each): the linear cross-entropy head, and
fused log-probs computed inside a sharded model's forward."""
from pathlib import Path

import pytest

from gloo_workers import needs_gloo, run_worker

HERE = Path(__file__).parent


@pytest.mark.skipif(needs_gloo, reason="needs torch.distributed with gloo")
def test_fsdp2_sharded_head_matches_unsharded():
    run_worker(HERE / "fsdp2_linear_cross_entropy.py", "FSDP2_LINEAR_CROSS_ENTROPY_OK", timeout=120)


@pytest.mark.skipif(needs_gloo, reason="needs torch.distributed with gloo")
def test_fsdp2_fused_head_logprobs_match_unsharded():
    """Fused log-probs inside an FSDP2-sharded model's forward (fastft.integrations.fused_head)."""
    pytest.importorskip("peft")
    run_worker(HERE / "fsdp2_fused_head.py", "FSDP2_FUSED_HEAD_OK")
