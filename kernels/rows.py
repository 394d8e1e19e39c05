"""Row bookkeeping shared by the log-prob launchers: compaction of the rows that have work, kernel configs.

Compaction without a host sync: a stable sort of the row mask puts the rows with work first (in their original
order) and a one-element device tensor holds their count. Grids are sized by the total number of rows; a
program whose compacted position is at or past the count reads it and returns at once, so ignored prompt rows
and rows with a zero upstream gradient cost a launch slot, never vocabulary work.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


def interpreted() -> bool:
    """True when Triton kernels run in the interpreter (``TRITON_INTERPRET=1``) on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def compact_rows(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(order int32 [N], count int32 [1]): ``order[:count]`` are the indices where `mask` is True, ascending;
    the rest follow. Device-side only."""
    order = torch.sort((~mask).to(torch.int8), stable=True).indices.to(torch.int32)
    count = mask.sum(dtype=torch.int32).reshape(1)
    return order, count


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: float32 inputs stay exact ("ieee", not tf32); half inputs are exact anyway."""
    return "ieee" if dtype == torch.float32 else "tf32"


def upcast_operands(dtype: torch.dtype) -> bool:
    """Convert half operands to float32 before tl.dot: only under the interpreter, whose bf16 dot is wrong."""
    return interpreted() and dtype == torch.bfloat16


def store_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype kernels write their outputs in: the input's, except bf16 under the interpreter (which rounds
    bf16 stores wrongly), where float32 buffers are cast by torch afterwards."""
    return torch.float32 if upcast_operands(dtype) else dtype


@dataclass(frozen=True)
class TileConfig:
    """Block shape and launch parameters of one tiled kernel."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    group_m: int = 8

    def launch(self) -> dict:
        return {"num_warps": self.num_warps, "num_stages": self.num_stages}


# H100 starting points, not yet timed. Compiled ahead of time for sm_90 (tests/test_triton_logps.py), bf16
# 128×128×64 with 8 warps and 3 stages gives every tiled kernel wgmma, cp.async pipelining, <= 204 registers and
# no spills when D is a multiple of 64. The interpreter gets tiny tiles so tests stay fast.
GPU_TILE = TileConfig(block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=3)
GPU_TILE_FP32 = TileConfig(block_m=64, block_n=64, block_k=32, num_warps=4, num_stages=2)
INTERPRETER_TILE = TileConfig(block_m=16, block_n=32, block_k=16, num_warps=1, num_stages=1, group_m=2)


def tile_config(dtype: torch.dtype) -> TileConfig:
    if interpreted():
        return INTERPRETER_TILE
    return GPU_TILE_FP32 if dtype == torch.float32 else GPU_TILE


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of `device` (a small stand-in under the interpreter)."""
    if device.type != "cuda":
        return 2
    return torch.cuda.get_device_properties(device).multi_processor_count
