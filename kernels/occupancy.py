"""Theoretical occupancy of a compiled kernel on a GPU's SM: pure arithmetic, no GPU needed.

Given what the compiler reports for a kernel (registers per thread, dynamic shared memory per
block) and the launch's warps per block, :func:`occupancy` gives how many blocks, and so warps,
one SM can hold at once, and which resource limits it. It follows NVIDIA's occupancy calculator
(``cuda_occupancy.h`` in the CUDA toolkit, ``cudaOccMaxActiveBlocksPerMultiprocessor``):

* warps: ``max_warps // warps_per_block`` blocks;
* blocks: at most ``max_blocks`` resident blocks per SM;
* registers: allocated per warp, ``regs_per_thread × 32`` rounded up to 256; the register file
  is split over 4 SM sub-partitions, so an SM holds ``4 × ((65536 / 4) // regs_per_warp)`` warps;
  a block whose warps (rounded up to a multiple of 4) need more than 65536 registers, or a
  thread with more than 255, cannot launch (0 blocks);
* shared memory: per block the kernel's shared memory plus 1 KB the driver reserves (sm_80 on),
  rounded up to 128 bytes; the SM's capacity is the largest carveout (the driver picks the
  carveout a launch needs); a block above the per-block opt-in maximum cannot launch.

The per-SM limits (:data:`LIMITS`) are NVIDIA's published figures; BENCHMARKS.md cites them:
A100 (sm_80): 64 warps, 32 blocks, 65536 registers, 164 KB shared memory per SM (163 KB per
block); H100 / H200 (sm_90) and B200 (sm_100): 64 warps, 32 blocks, 65536 registers, 228 KB
shared memory per SM (227 KB per block). ``sm_count`` is a property of the part, not of the
arch: A100 108, H100 SXM / H200 132, B200 148 SMs; it only enters :func:`waves`.

Occupancy here is the theoretical upper bound: what resources allow, not what the scheduler
achieves, and a grid with fewer blocks than ``blocks_per_sm × sm_count`` leaves SMs idle
(:func:`waves` < 1).
"""

from __future__ import annotations

from dataclasses import dataclass

WARP_SIZE = 32


@dataclass(frozen=True)
class SMLimits:
    """Per-SM resource limits of one GPU architecture (and the SM count of its named part)."""

    arch: str
    gpus: str
    sm_count: int
    shared_per_sm: int  # bytes: the largest shared-memory carveout
    max_shared_per_block: int  # bytes: the opt-in maximum of one block (dynamic + static)
    max_warps: int = 64
    max_blocks: int = 32
    regs_per_sm: int = 65536
    max_regs_per_block: int = 65536
    max_regs_per_thread: int = 255
    reg_alloc_unit: int = 256  # registers, allocated per warp
    sub_partitions: int = 4
    shared_alloc_unit: int = 128  # bytes
    reserved_shared_per_block: int = 1024  # bytes the driver reserves per block (sm_80 and later)


LIMITS: dict[str, SMLimits] = {
    "sm_80": SMLimits("sm_80", "A100", 108, shared_per_sm=164 * 1024, max_shared_per_block=163 * 1024),
    "sm_90": SMLimits("sm_90", "H100 SXM / H200", 132, shared_per_sm=228 * 1024, max_shared_per_block=227 * 1024),
    "sm_100": SMLimits("sm_100", "B200", 148, shared_per_sm=228 * 1024, max_shared_per_block=227 * 1024),
}


@dataclass(frozen=True)
class Occupancy:
    """Blocks and warps one SM holds at once, the limit of each resource, and the binding one."""

    blocks_per_sm: int
    warps_per_sm: int
    max_warps: int
    by_warps: int
    by_blocks: int
    by_registers: int
    by_shared: int
    limiter: str  # "warps", "blocks", "registers" or "shared" (the first that binds, in that order)

    @property
    def fraction(self) -> float:
        """Active warps / maximum warps per SM."""
        return self.warps_per_sm / self.max_warps


def _round_up(value: int, unit: int) -> int:
    return -(-value // unit) * unit


def occupancy(regs_per_thread: int, shared_per_block: int, num_warps: int, limits: SMLimits) -> Occupancy:
    """Theoretical occupancy of blocks of ``num_warps`` warps using ``regs_per_thread`` registers per
    thread and ``shared_per_block`` bytes of (dynamic) shared memory, on an SM with ``limits``."""
    for name, value in (("regs_per_thread", regs_per_thread), ("shared_per_block", shared_per_block)):
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"{name}={value!r} is not allowed; it must be an int >= 0")
    if not isinstance(num_warps, int) or not 1 <= num_warps <= 1024 // WARP_SIZE:
        raise ValueError(f"num_warps={num_warps!r} is not allowed; it must be an int in [1, {1024 // WARP_SIZE}]")
    lim = limits
    by_warps = lim.max_warps // num_warps
    by_blocks = lim.max_blocks

    regs_per_warp = _round_up(regs_per_thread * WARP_SIZE, lim.reg_alloc_unit)
    assumed_per_block = regs_per_warp * _round_up(num_warps, lim.sub_partitions)  # the hardware's launch check
    if (regs_per_thread > lim.max_regs_per_thread or assumed_per_block > lim.max_regs_per_block
            or regs_per_warp * num_warps > lim.max_regs_per_block):
        by_registers = 0
    elif regs_per_warp == 0:
        by_registers = by_blocks
    else:
        warps_per_partition = (lim.regs_per_sm // lim.sub_partitions) // regs_per_warp
        by_registers = warps_per_partition * lim.sub_partitions // num_warps

    shared = _round_up(shared_per_block + lim.reserved_shared_per_block, lim.shared_alloc_unit)
    if shared > lim.max_shared_per_block + lim.reserved_shared_per_block:
        by_shared = 0
    else:
        by_shared = lim.shared_per_sm // shared

    limits_by = {"warps": by_warps, "blocks": by_blocks, "registers": by_registers, "shared": by_shared}
    blocks = min(limits_by.values())
    limiter = next(name for name, value in limits_by.items() if value == blocks)
    return Occupancy(blocks, blocks * num_warps, lim.max_warps, by_warps, by_blocks, by_registers, by_shared,
                     limiter)


def waves(programs: int, occ: Occupancy, limits: SMLimits) -> float:
    """How many rounds of ``occ.blocks_per_sm`` blocks on every SM a grid of ``programs`` blocks
    takes (< 1: some SMs get no block; inf: the block cannot launch)."""
    slots = occ.blocks_per_sm * limits.sm_count
    return programs / slots if slots else float("inf")
