"""The static GPU tier's parts: the occupancy formula on cases worked through CUDA's occupancy calculator
(cuda_occupancy.h), the PTX/SASS load counter, the CUDA launch-site reader, the floors, the live-bytes
tracker of the memory plan, and a smoke compile of one Triton kernel for sm_90 (in a subprocess: this test
process runs Triton under its interpreter)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.gpu_static.cuda_side import launch_threads, threads_for_row  # noqa: E402
from benchmarks.gpu_static.floors import check, floor_for  # noqa: E402
from benchmarks.gpu_static.loads import count_global_loads  # noqa: E402
from benchmarks.gpu_static.memory_plan import PLANS, LiveBytes, measure  # noqa: E402
from benchmarks.gpu_static.occupancy import ARCHS, occupancy  # noqa: E402

SM90, SM80 = ARCHS["sm_90"], ARCHS["sm_80"]


# Each case: (arch, registers, threads, shared bytes) -> (CTAs/SM, warps/SM, limiter), with the calculator's steps.
@pytest.mark.parametrize("arch, regs, threads, smem, ctas, warps, limiter", [
    # 255 regs -> 8160 per warp, rounded to 8192; 16384 per sub-partition / 8192 = 2 warps x 4 = 8 warps: one 8-warp CTA.
    (SM90, 255, 256, 0, 1, 8, "registers"),
    # 86 regs (the Triton full-KL forward) -> 2816 per warp; 5 warps per sub-partition = 20 < 2 x 16: one CTA.
    (SM90, 86, 512, 0, 1, 16, "registers"),
    # 64 regs -> 2048 per warp; 8 warps per sub-partition = 32 warps: two 16-warp CTAs.
    (SM90, 64, 512, 0, 2, 32, "registers"),
    # 32 regs x 4 warps: 64 warps per SM allow 16 CTAs before the registers (64 warps) or the 32-CTA limit.
    (SM90, 32, 128, 0, 16, 64, "registers"),
    # Shared-memory bound: 100 KB + 1 KB reserve = 103,424 B; sm_80 has 167,936 B per SM -> 1; sm_90 233,472 B -> 2.
    (SM80, 32, 128, 100 * 1024, 1, 4, "shared memory"),
    (SM90, 32, 128, 100 * 1024, 2, 8, "shared memory"),
    # One-warp CTAs: the 32-CTA limit binds.
    (SM90, 16, 32, 0, 32, 32, "blocks"),
])
def test_occupancy_matches_the_calculator(arch, regs, threads, smem, ctas, warps, limiter):
    occ = occupancy(arch, regs, threads, smem)
    assert (occ.ctas_per_sm, occ.warps_per_sm) == (ctas, warps)
    assert occ.limiter == limiter


@pytest.mark.parametrize("arch, regs, threads, smem", [
    (SM90, 255, 512, 0),          # 16 warps x 8192 registers = 131,072 > 65,536 per CTA
    (SM90, 32, 256, 228 * 1024),  # above the 227 KB opt-in limit per CTA
    (SM80, 32, 256, 164 * 1024),  # above sm_80's 163 KB
    (SM90, 32, 2048, 0),          # above 1024 threads per CTA
])
def test_occupancy_cannot_launch(arch, regs, threads, smem):
    occ = occupancy(arch, regs, threads, smem)
    assert occ.ctas_per_sm == 0 and not occ.launchable


def test_occupancy_rejects_nonsense():
    with pytest.raises(ValueError):
        occupancy(SM90, 32, 0, 0)


PTX = """
    @%p1 ld.global.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd1 + 0 ];
    ld.global.nc.v2.b64 { %rd5, %rd6 }, [ %rd2 ];
    @%p2 ld.global.L1::evict_last.v4.b32 { %r5, %r6, %r7, %r8 }, [ %rd3 + 0 ];
    @%p3 ld.global.b16 { %rs1 }, [ %rd4 + 0 ];
    ld.global.v2.b32 { %r9, %r10 }, [ %rd7 ];
    ld.shared.v4.b32 { %r11, %r12, %r13, %r14 }, [ %r15 ];
    st.global.v4.b32 [ %rd8 ], { %r1, %r2, %r3, %r4 };
"""
SASS = """
        /*0150*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0160*/                   LDG.E.128.CONSTANT R8, desc[UR4][R2.64+0x10] ;
        /*0170*/                   LDG.E.U16 R12, desc[UR4][R6.64] ;
        /*0180*/                   LDG.E.64 R14, desc[UR4][R6.64] ;
        /*0190*/                   LDG.E R16, desc[UR4][R6.64] ;
        /*01a0*/                   LDS.128 R20, [R0] ;
        /*01b0*/                   STG.E.128 desc[UR4][R2.64], R4 ;
"""


def test_load_counter_ptx():
    counts = count_global_loads(PTX)
    assert (counts.vector16, counts.narrower) == (3, 2)  # v4.b32 twice and v2.b64; b16 and v2.b32 (8 bytes)


def test_load_counter_sass():
    counts = count_global_loads(SASS)
    assert (counts.vector16, counts.narrower) == (2, 3)  # shared loads and stores are not global loads


def test_launch_sites_and_threads_for_row():
    source = """
    constexpr int kThreads = 256;
    act_kernel<scalar_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(a, b);
    row_kernel<scalar_t><<<static_cast<unsigned>(N), threads_for_row(V, sizeof(scalar_t)), 0,
                           stream>>>(x, y);
    auto kernel = mixed ? kl_kernel<scalar_t, true> : kl_kernel<scalar_t, false>;
    kernel<<<static_cast<unsigned>(N), kRowThreads, 0, stream>>>(x, y);
    """
    assert launch_threads(source) == {"act_kernel": "kThreads", "row_kernel": "threads_for_row(V, sizeof(scalar_t))",
                                      "kernel": "kRowThreads", "kl_kernel": "kRowThreads"}
    constants = {"kWarp": 32, "kMaxThreads": 1024}
    assert threads_for_row(128256, 2, constants) == 1024   # capped
    assert threads_for_row(4096, 2, constants) == 512      # 512 16-byte packs -> 16 warps
    assert threads_for_row(3, 4, constants) == 32          # at least one warp


def test_floors():
    row = floor_for("_cross_entropy_fwd_kernel")
    assert row.min_ctas == 2 and row.vector_loads
    assert floor_for("fastft::(anonymous namespace)::full_kl_fwd_kernel<c10::BFloat16>") is row
    assert floor_for("_lora_matmul_kernel").min_ctas == 1
    assert check(row, ctas=2, warps=32, local=0, vector16=4, error=None) == []
    assert check(row, ctas=1, warps=16, local=8, vector16=0, error=None) == [
        "8 B stack frame/local memory", "1 CTA/SM < 2", "no 16-byte loads"]
    assert check(row, ctas=0, warps=0, local=0, vector16=1, error=None) == ["cannot launch"]


def test_live_bytes_tracks_allocations_frees_and_traffic():
    tracker = LiveBytes()
    x = torch.ones(1000)                       # an input: allocated before, not counted
    with tracker:
        a = torch.empty(1000)                  # +4000 B, no traffic
        b = a.add(x)                           # +4000 B; reads 8000, writes 4000
        del a                                  # -4000 B
        c = b.view(10, 100)                    # a view: no storage, no traffic
        b.add_(1.0)                            # in place: reads and writes b
    assert tracker.peak == 8000
    assert tracker.now == 4000
    assert tracker.traffic_scaled == 12000 + 8000
    del b, c
    assert tracker.now == 0                    # freed after the mode ended too


def test_live_bytes_scales_by_shape():
    tracker = LiveBytes(factor=lambda shape: 4.0 if 250 in shape else 1.0)
    with tracker:
        a = torch.empty(250, 2)                # 2000 B, scaled x4
        b = torch.empty(10)                    # 40 B
    assert tracker.peak == 2040 and tracker.peak_scaled == 8040
    del a, b


def test_plan_scales_a_known_op_to_its_gpu_shape():
    # SwiGLU forward + backward holds out, grad_gate and grad_up: 3 x N x I bf16 at the GPU shape, whatever
    # the scaled shape it ran at; its traffic is at least the 8 N x I tensors the math reads and writes.
    plan = next(p for p in PLANS if p.op == "swiglu")
    m = measure(plan, "cpp")
    n, i = plan.gpu["N"], plan.gpu["I"]
    assert m.peak == pytest.approx(3 * n * i * 2, rel=0.01)
    assert m.raw_peak == pytest.approx(3 * plan.scaled["N"] * plan.scaled["I"] * 2, rel=0.01)
    assert m.traffic >= 8 * n * i * 2 * 0.99


def test_smoke_compile_one_triton_kernel_for_sm_90(tmp_path):
    pytest.importorskip("triton")
    out = tmp_path / "gpu_static.md"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    run = subprocess.run([sys.executable, "-m", "benchmarks.gpu_static", "--only", "swiglu", "--arch", "sm_90",
                          "--workers", "1", "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode in (0, 1), run.stderr[-2000:]
    rows = [line for line in out.read_text().splitlines() if line.startswith("| _swiglu_fwd_kernel")]
    assert rows, out.read_text()[-2000:]
    cells = [c.strip() for c in rows[0].split("|")]
    regs, threads, ctas = int(cells[4]), int(cells[7]), int(cells[8])
    assert cells[3] == "sm_90" and 0 < regs <= 255 and threads == 128 and ctas >= 1
