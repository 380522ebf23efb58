"""CUDA occupancy (resident CTAs and warps per SM) from a kernel's registers, threads and shared memory.

The formula is the CUDA occupancy calculator's (cuda_occupancy.h, CUDA 13.0: cudaOccMaxBlocksPerSMRegsLimit,
cudaOccMaxBlocksPerSMSmemLimit, the warp and block limits), for the default shared-memory carveout (the whole
shared memory of the SM) and a kernel that opts in to more than 48 KB of dynamic shared memory (Triton does so):
  - registers are allocated per warp, regs x 32 rounded up to 256; they come from 4 sub-partitions of
    65,536 / 4 registers each, and a CTA must also fit the hardware's per-CTA check (warps rounded up to 4);
  - shared memory per CTA is static + dynamic + 1 KB the driver reserves (sm_80 on), rounded up to 128 bytes;
  - at most max_warps / warps-per-CTA and max_blocks CTAs.
"""
from dataclasses import dataclass

__all__ = ["ARCHS", "Arch", "Occupancy", "occupancy"]


@dataclass(frozen=True)
class Arch:
    name: str
    capability: int           # 90 for sm_90
    sms: int
    regs_per_sm: int = 65536
    regs_per_block: int = 65536
    max_regs_per_thread: int = 255
    smem_per_sm: int = 228 * 1024
    smem_per_block_optin: int = 227 * 1024
    reserved_smem_per_block: int = 1024
    smem_granularity: int = 128
    reg_granularity: int = 256      # registers per warp are rounded up to this
    sub_partitions: int = 4
    max_threads_per_sm: int = 2048
    max_threads_per_block: int = 1024
    max_blocks_per_sm: int = 32
    warp_size: int = 32


ARCHS = {
    "sm_90": Arch("sm_90", 90, sms=132, smem_per_sm=228 * 1024, smem_per_block_optin=227 * 1024),
    "sm_80": Arch("sm_80", 80, sms=108, smem_per_sm=164 * 1024, smem_per_block_optin=163 * 1024),
}


@dataclass(frozen=True)
class Occupancy:
    ctas_per_sm: int
    warps_per_sm: int
    limiter: str              # "registers", "shared memory", "warps", "blocks", or why it cannot launch

    @property
    def launchable(self) -> bool:
        return self.ctas_per_sm > 0


def _round_up(x: int, to: int) -> int:
    return -(-x // to) * to


def occupancy(arch: Arch, regs_per_thread: int, threads_per_cta: int, smem_bytes: int) -> Occupancy:
    """CTAs and warps resident per SM. ``smem_bytes`` is the CTA's static + dynamic shared memory (without the
    1 KB reserve, which is added here)."""
    if threads_per_cta <= 0 or regs_per_thread < 0 or smem_bytes < 0:
        raise ValueError(f"occupancy: bad input regs={regs_per_thread} threads={threads_per_cta} smem={smem_bytes}")
    warps = -(-threads_per_cta // arch.warp_size)
    if threads_per_cta > arch.max_threads_per_block:
        return Occupancy(0, 0, f"{threads_per_cta} threads > {arch.max_threads_per_block} per CTA")

    # Registers.
    if regs_per_thread > arch.max_regs_per_thread:
        return Occupancy(0, 0, f"{regs_per_thread} registers > {arch.max_regs_per_thread} per thread")
    regs_per_warp = _round_up(regs_per_thread * arch.warp_size, arch.reg_granularity)
    if regs_per_warp * _round_up(warps, arch.sub_partitions) > arch.regs_per_block:
        return Occupancy(0, 0, f"{regs_per_warp * _round_up(warps, arch.sub_partitions)} registers > "
                               f"{arch.regs_per_block} per CTA")
    if regs_per_warp:
        warps_per_sub_partition = (arch.regs_per_sm // arch.sub_partitions) // regs_per_warp
        by_regs = warps_per_sub_partition * arch.sub_partitions // warps
    else:
        by_regs = arch.max_blocks_per_sm

    # Shared memory.
    smem_per_cta = _round_up(smem_bytes + arch.reserved_smem_per_block, arch.smem_granularity)
    if smem_per_cta > arch.smem_per_block_optin + arch.reserved_smem_per_block:
        return Occupancy(0, 0, f"{smem_per_cta} B shared memory > {arch.smem_per_block_optin} B per CTA")
    by_smem = arch.smem_per_sm // smem_per_cta

    by_warps = (arch.max_threads_per_sm // arch.warp_size) // warps
    limits = {"registers": by_regs, "shared memory": by_smem, "warps": by_warps, "blocks": arch.max_blocks_per_sm}
    limiter = min(limits, key=limits.get)
    ctas = limits[limiter]
    return Occupancy(ctas, ctas * warps, limiter)
