"""Row offsets of the Triton KL kernels are 64-bit: row * V passes 2**31 at LLM sizes (16k tokens x 128k
vocabulary), far beyond what a test can allocate here, so the check reads the kernels' compiled IR.

Each kernel is compiled for sm_90 ahead of time (no GPU needed; the interpreter does not produce IR, so this
runs in a subprocess without TRITON_INTERPRET) and its TTIR must widen the program id to i64 before any use:
every offset built from the row index is then i64. The CUDA and C++ kernels index rows with int64_t.
"""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent(r"""
    import re, sys
    import triton
    from triton.compiler import ASTSource
    from triton.backends.compiler import GPUTarget
    import fastft.kernels.kl as K

    P, F = "*bf16", "*fp32"
    kl_fwd = dict(policy_ptr=P, stride_p="i32", ref_ptr=P, stride_r="i32", mask_ptr="*i1", grad_scale_ptr=F,
                  kl_ptr=F, lse_p_ptr=F, lse_r_ptr=F, kl_rev_ptr=F, grad_p_ptr=P, grad_r_ptr=P, V="i32",
                  inv_t="fp32", w="fp32")
    kl_bwd = dict(grad_kl_ptr=F, policy_ptr=P, stride_p="i32", ref_ptr=P, stride_r="i32", mask_ptr="*i1",
                  lse_p_ptr=F, lse_r_ptr=F, kl_ptr=F, kl_rev_ptr=F, grad_p_ptr=P, grad_r_ptr=P, V="i32",
                  inv_t="fp32", w="fp32")
    sel_fwd = dict(logits_ptr=P, stride_row="i32", index_ptr="*i64", logp_ptr=F, lse_ptr=F, entropy_ptr=F,
                   V="i32", inv_t="fp32", ignore_index="i64")
    sel_bwd = dict(grad_logp_ptr=F, grad_entropy_ptr=F, logits_ptr=P, stride_row="i32", index_ptr="*i64",
                   lse_ptr=F, entropy_ptr=F, grad_ptr=P, V="i32", inv_t="fp32", ignore_index="i64")
    grads = dict(HAS_MASK=True, GRAD_POLICY=True, GRAD_REF=True, HAS_REVERSE=False, BF16_RNE_BY_HAND=False,
                 BLOCK=2048)
    mixed = dict(grads, HAS_REVERSE=True)  # both KL directions (reverse_weight > 0)
    cases = [(K._full_kl_fwd_kernel, kl_fwd, grads), (K._full_kl_bwd_kernel, kl_bwd, grads),
             (K._full_kl_fwd_kernel, kl_fwd, mixed), (K._full_kl_bwd_kernel, kl_bwd, mixed),
             (K._selective_log_softmax_fwd_kernel, sel_fwd, dict(VEC=8, BLOCK=2048)),
             (K._selective_log_softmax_bwd_kernel, sel_bwd, dict(HAS_GRAD_ENTROPY=True, BF16_RNE_BY_HAND=False,
                                                                      VEC=8, GRAD_ALIGNED_LIKE_LOGITS=True,
                                                                      BLOCK=2048))]
    for fn, sig, consts in cases:
        sig = dict(sig, **{k: "constexpr" for k in consts})
        compiled = triton.compile(ASTSource(fn, sig, consts), target=GPUTarget("cuda", 90, 32),
                                  options=dict(num_warps=8))
        ttir = compiled.asm["ttir"]
        pids = re.findall(r"(%[\w.]+) = tt.get_program_id x : i32", ttir)
        assert len(pids) == 1, (fn.__name__, pids)
        uses = [l.strip() for l in ttir.splitlines() if re.search(re.escape(pids[0]) + r"\b", l)
                and "get_program_id" not in l]
        assert uses and all(re.match(r"%[\w.]+ = arith.extsi " + re.escape(pids[0]) + r" : i32 to i64", u)
                            for u in uses), (fn.__name__, uses)
        print(fn.__name__, "row index widened to i64 before", len(uses), "use(s)")
""")


def test_triton_kl_row_offsets_are_int64():
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    run = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count("widened to i64") == 6, run.stdout  # full_kl fwd / bwd with and without HAS_REVERSE
