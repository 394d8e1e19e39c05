"""Fused preference loss vs the same formulas in eager PyTorch: time of forward + backward and op launches.

    python benchmarks/bench_preference_loss.py            # CPU tensors: "cpp" backend vs "torch" (eager)
    python benchmarks/bench_preference_loss.py --device cuda   # CUDA tensors: "triton" backend vs "torch"

For B ∈ {8, 64, 512} pairs and a few loss types, it measures the median wall time of one forward + backward
(CPU: perf_counter over many repeats; CUDA: triton.testing.do_bench) and counts what runs: dispatched aten /
fastpref ops on CPU, CUDA kernels (torch.profiler) on CUDA. Value checks are switched off
(FASTPREF_SKIP_VALUE_CHECKS=1) for both sides, so the op itself is measured. Results go to
benchmarks/results/preference_loss_<device>.json with a PNG beside it (benchmarks/record.py).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ["FASTPREF_SKIP_VALUE_CHECKS"] = "1"

import torch
from record import plot_results, save_results
from torch.utils._python_dispatch import TorchDispatchMode

import fastpref

SIZES = (8, 64, 512)
CASES = {
    "sigmoid": {"loss_type": "sigmoid"},
    "sr_dpo": {"loss_type": "sr_dpo"},
    "rpo (sigmoid+sft)": {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 1.0]},
    "aot": {"loss_type": "aot", "label_smoothing": 0.1},
    "ipo+weights": {"loss_type": "ipo", "weights": True},
    "sigmoid float64": {"loss_type": "sigmoid", "dtype": torch.float64},  # float64 in, float64 arithmetic out
}


def _inputs(num_pairs: int, case: dict, device: str, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    dtype = case.get("dtype", torch.float32)

    def logps():
        return (-5 - 295 * torch.rand(num_pairs, generator=gen, dtype=torch.float64)).to(device=device, dtype=dtype)

    tensors = {"chosen_logps": logps().requires_grad_(), "rejected_logps": logps().requires_grad_(),
               "ref_chosen_logps": logps(), "ref_rejected_logps": logps()}
    kwargs = {k: v for k, v in case.items() if k not in ("weights", "dtype")}
    kwargs["chosen_counts"] = torch.randint(1, 300, (num_pairs,), generator=gen).to(device)
    kwargs["rejected_counts"] = torch.randint(1, 300, (num_pairs,), generator=gen).to(device)
    if case.get("weights"):
        kwargs["weights"] = torch.rand(num_pairs, generator=gen).to(device=device, dtype=dtype)
    if case["loss_type"] == "sr_dpo":
        for key in ("aug_chosen_logps", "aug_rejected_logps", "aug_ref_chosen_logps", "aug_ref_rejected_logps"):
            kwargs[key] = logps()
    return tensors, kwargs


def _step(tensors, kwargs, backend):
    out = fastpref.preference_loss(**tensors, **kwargs, backend=backend)
    out.loss.backward()
    return out


class _CountOps(TorchDispatchMode):
    """Counts the ops that reach a kernel (aliasing ops excluded)."""

    SKIP = frozenset({"detach", "alias", "view", "t", "_unsafe_view", "expand", "as_strided"})

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ not in self.SKIP:
            self.count += 1
        return func(*args, **(kwargs or {}))


def _launches_cpu(tensors, kwargs, backend) -> tuple[int, int]:
    with _CountOps() as forward:
        out = fastpref.preference_loss(**tensors, **kwargs, backend=backend)
    with _CountOps() as backward:
        out.loss.backward()
    return forward.count, backward.count


def _launches_cuda(tensors, kwargs, backend) -> tuple[int, int]:
    from torch.profiler import ProfilerActivity, profile

    def kernels(prof):
        return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)

    with profile(activities=[ProfilerActivity.CUDA]) as forward:
        out = fastpref.preference_loss(**tensors, **kwargs, backend=backend)
        torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as backward:
        out.loss.backward()
        torch.cuda.synchronize()
    return kernels(forward), kernels(backward)


def _time_cpu(tensors, kwargs, backend, repeats: int) -> float:
    for _ in range(10):
        _step(tensors, kwargs, backend)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        _step(tensors, kwargs, backend)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e6


def _time_cuda(tensors, kwargs, backend) -> float:
    import triton.testing

    return triton.testing.do_bench(lambda: _step(tensors, kwargs, backend), return_mode="median") * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=300)
    args = parser.parse_args()
    fused = "triton" if args.device == "cuda" else "cpp"
    records = []
    for name, case in CASES.items():
        if args.device == "cuda" and case.get("dtype") == torch.float64:
            continue  # the triton backend refuses float64 (backend=None runs it on "torch")
        for num_pairs in SIZES:
            tensors, kwargs = _inputs(num_pairs, case, args.device)
            for backend, impl in ((fused, f"fused ({fused})"), ("torch", "eager torch")):
                if args.device == "cuda":
                    _step(tensors, kwargs, backend)
                    ops_forward, ops_backward = _launches_cuda(tensors, kwargs, backend)
                    median_us = _time_cuda(tensors, kwargs, backend)
                else:
                    ops_forward, ops_backward = _launches_cpu(tensors, kwargs, backend)
                    median_us = _time_cpu(tensors, kwargs, backend, args.repeats)
                records.append({"loss_type": name, "B": num_pairs, "impl": impl, "median_us": round(median_us, 2),
                                "launches_forward": ops_forward, "launches_backward": ops_backward,
                                "launches": ops_forward + ops_backward})
                print(f"{name:>18} B={num_pairs:<4} {impl:>14}: {median_us:9.1f} us  launches fwd {ops_forward:3d} "
                      f"bwd {ops_backward:3d}", flush=True)
    meta = {"what": "forward + backward of fastpref.preference_loss, median", "device_tensors": args.device,
            "value_checks": "off (FASTPREF_SKIP_VALUE_CHECKS=1)",
            "launches": "dispatched ops (CPU) or CUDA kernels (GPU), aliasing ops excluded",
            "torch_threads": torch.get_num_threads()}
    path = save_results(f"preference_loss_{args.device}", records, meta)
    print(plot_results(path, x="B", y="median_us", group="impl", facet="loss_type"))


if __name__ == "__main__":
    main()
