"""Build script for fastpref.

The compiled extension ``fastpref._C`` holds the CPU kernels (``csrc/*.cpp``; OpenMP where the compiler has it).
torch is never a build-time download (a bare ``torch`` build requirement pulls a multi-GB CUDA wheel): install
torch first, then ``pip install --no-build-isolation .`` (or ``-e .``) so the build compiles against that torch.

Environment switches (also in the README):
  FASTPREF_NO_EXT=1     pure-Python install: no ``fastpref._C`` (the "cpp" backend reports why it is missing).
  MAX_JOBS=N            parallel compile jobs (torch's own switch).
A switch is on when its value is 1, true, yes or on (any case, surrounding spaces ignored).
"""

from __future__ import annotations

import glob
import os
import subprocess
import sys
import tempfile

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))

NO_TORCH_MESSAGE = """fastpref: the build cannot import torch ({error}).
fastpref._C compiles against the torch you run, so torch must be importable by the build. pip's default build
isolation builds in a fresh environment without your torch (and fastpref does not list torch as a build
requirement: that would download a multi-GB CUDA wheel). Install torch first, then:
    pip install --no-build-isolation .        (or -e . for development)
or build without the compiled kernels: FASTPREF_NO_EXT=1 pip install ."""


def env_flag(name: str) -> bool:
    """True when the environment variable is 1/true/yes/on (any case, spaces stripped)."""
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def _openmp_flags(compiler: str) -> list[str]:
    """Return ["-fopenmp"] when the C++ compiler accepts it, else [] (the kernels then run single-threaded)."""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "omp.cpp")
        with open(src, "w") as f:
            f.write("#include <omp.h>\nint main() { return omp_get_max_threads() > 0 ? 0 : 1; }\n")
        try:
            done = subprocess.run(
                [compiler, "-fopenmp", src, "-o", os.path.join(tmp, "omp")],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                check=False,
            )
        except OSError:
            return []
        return ["-fopenmp"] if done.returncode == 0 else []


def _import_torch():
    """torch, or a short exit (no traceback) saying how to build when the build cannot import it."""
    try:
        import torch
    except ImportError as err:
        raise SystemExit(NO_TORCH_MESSAGE.format(error=err)) from None
    return torch


def _extensions():
    if env_flag("FASTPREF_NO_EXT"):
        print("fastpref: FASTPREF_NO_EXT=1, building no compiled extension", file=sys.stderr)
        return [], {}
    torch = _import_torch()
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    omp = _openmp_flags(os.environ.get("CXX", "c++"))
    torch_version = torch.__version__.split("+")[0]
    ext = CppExtension(
        "fastpref._C",
        sorted(glob.glob(os.path.join("csrc", "*.cpp"))),
        define_macros=[("FASTPREF_TORCH_VERSION", f'"{torch_version}"')],
        extra_compile_args={"cxx": ["-O3", *omp]},
        extra_link_args=list(omp),
    )
    print(f"fastpref: building fastpref._C (openmp={bool(omp)})", file=sys.stderr)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    name="fastpref",
    version="0.1.0",
    description="Fused kernels and a thin trainer for DPO-family preference optimization",
    long_description=open(os.path.join(ROOT, "README.md"), encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # The Triton kernels live in kernels/ but ship as fastpref.kernels: never a top-level `kernels`.
    packages=[*find_packages(include=["fastpref", "fastpref.*"]), "fastpref.kernels"],
    package_dir={"fastpref.kernels": "kernels"},
    package_data={"fastpref": ["data/*.jsonl"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    install_requires=["torch>=2.4", "numpy"],
    extras_require={
        "triton": ["triton>=3.2"],
        "train": [
            "transformers>=4.56",
            "peft>=0.17",
            "accelerate>=1.4",
            "datasets>=3.0",
            "safetensors>=0.4",
            "tokenizers>=0.21",
            "tqdm",
        ],
        # deepspeed: the ZeRO-2/3 engine tests (tests/test_engines.py) run on CPU in CI; Linux only
        "test": ["pytest>=8", "pytest-benchmark>=4", "hypothesis>=6.100", "matplotlib>=3.7", "trl>=1.0",
                 "deepspeed>=0.18; platform_system == 'Linux'"],
    },
    entry_points={"console_scripts": ["fastpref=fastpref.cli:main"]},
    zip_safe=False,
)
