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


def _index_scalar_in_interpreter() -> None:
    """Let ``range()`` take run-time bounds in triton 3.6's interpreter (the GPU image's triton).

    Its interpreter turns a Triton scalar into a Python int with ``int(array)`` on a one-element array, which NumPy
    2.x refuses ("only 0-dimensional arrays can be converted"), so every loop with a run-time bound fails there;
    triton 3.9 squeezes the array first. This applies the same squeeze to older interpreters, in the interpreter
    only: compiled kernels never reach this code.
    """
    try:
        from triton.runtime import interpreter
    except ImportError:
        return
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "squeezes_scalars", False):
        return

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patch_lang_tensor.squeezes_scalars = True
    interpreter._patch_lang_tensor = patch_lang_tensor


if interpreted():
    _index_scalar_in_interpreter()


def refuse_float64(name: str, tensor: torch.Tensor) -> None:
    """The Triton kernels accumulate in float32: a float64 input is refused by name (never silently rounded)."""
    if tensor.dtype == torch.float64:
        raise TypeError(f"{name} is float64: the Triton log-prob kernels compute in float32 and take float16, "
                        f"bfloat16 or float32 inputs (fastpref.linear_logps runs float64 on the torch tiles)")


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


@dataclass(frozen=True)
class KernelTiles:
    """The tile configurations of one kernel: half-precision and float32 inputs on a GPU, and the interpreter's
    (tiny tiles: it runs every program in Python)."""

    gpu: TileConfig
    gpu_fp32: TileConfig
    interpreter: TileConfig


# H100 starting points, not yet timed (the tile sweep of benchmarks/gpu_check.sh decides). Each is compiled ahead
# of time for sm_90 by tests/test_triton_logps.py: wgmma, cp.async pipelining, no register spills when D is a
# multiple of 64. Wider tiles spill there with one warpgroup pair (forward 128×256: 1.5 KB of stack, dW 128×256:
# 8 bytes), so the wider shapes wait for the GPU sweep. The row kernels of the backward (dlogits, dH) share
# block_m: the row chunk is a multiple of it.
_FP32 = TileConfig(block_m=64, block_n=64, block_k=32, num_warps=4, num_stages=2)
_TINY = TileConfig(block_m=16, block_n=32, block_k=16, num_warps=1, num_stages=1, group_m=2)
TILES = {
    "forward": KernelTiles(TileConfig(128, 128, 64, num_warps=8, num_stages=3), _FP32, _TINY),
    # Four more running values per row (token statistics) or the U accumulator (frozen head): narrower tiles.
    "forward_stats": KernelTiles(TileConfig(128, 64, 32, num_warps=8, num_stages=3), _FP32,
                                 TileConfig(16, 16, 16, num_warps=1, num_stages=1, group_m=2)),
    "forward_unit": KernelTiles(TileConfig(128, 64, 32, num_warps=8, num_stages=3), _FP32,
                                TileConfig(16, 16, 16, num_warps=1, num_stages=1, group_m=2)),
    "dlogits": KernelTiles(TileConfig(128, 128, 64, num_warps=8, num_stages=3), _FP32, _TINY),
    "hidden_grad": KernelTiles(TileConfig(128, 128, 64, num_warps=8, num_stages=3), _FP32, _TINY),
    "weight_grad": KernelTiles(TileConfig(128, 128, 64, num_warps=8, num_stages=3), _FP32, _TINY),
}


def tile_config(kernel: str, dtype: torch.dtype) -> TileConfig:
    """The configuration of `kernel` (a key of TILES) for inputs of `dtype` on this machine."""
    tiles = TILES[kernel]
    if interpreted():
        return tiles.interpreter
    return tiles.gpu_fp32 if dtype == torch.float32 else tiles.gpu


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of `device` (a small stand-in under the interpreter)."""
    if device.type != "cuda":
        return 2
    return torch.cuda.get_device_properties(device).multi_processor_count
