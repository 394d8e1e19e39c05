"""Build script for fastpref.

The compiled extension ``fastpref._C`` holds the CPU kernels (always built, OpenMP where the compiler has it)
and, when torch has CUDA and a toolkit is found, CUDA sources (``csrc/*.cu``). torch is never a build-time
download: install torch first, then ``pip install --no-build-isolation .`` (or ``-e .``).

Environment switches (also in the README):
  FASTPREF_NO_EXT=1     pure-Python install: no ``fastpref._C`` (the "cpp" backend reports why it is missing).
  FASTPREF_SKIP_CUDA=1  build only the CPU sources even where CUDA is available.
  FASTPREF_FORCE_CUDA=1 build the CUDA sources on a machine without a GPU (needs a toolkit and
                        TORCH_CUDA_ARCH_LIST, e.g. "9.0").
  MAX_JOBS=N            parallel compile jobs (torch's own switch).
"""

from __future__ import annotations

import glob
import os
import subprocess
import sys
import tempfile

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() in {"1", "true", "yes", "on"}


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


def _extensions():
    if _flag("FASTPREF_NO_EXT"):
        print("fastpref: FASTPREF_NO_EXT=1, building no compiled extension", file=sys.stderr)
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    cpu_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "*.cu")))
    want_cuda = bool(cuda_sources) and not _flag("FASTPREF_SKIP_CUDA")
    have_cuda = torch.version.cuda is not None and CUDA_HOME is not None
    use_cuda = want_cuda and (have_cuda and (torch.cuda.is_available() or _flag("FASTPREF_FORCE_CUDA")))

    omp = _openmp_flags(os.environ.get("CXX", "c++"))
    torch_version = torch.__version__.split("+")[0]
    macros = [("FASTPREF_TORCH_VERSION", f'"{torch_version}"')]
    cxx_flags = ["-O3", *omp]
    link_flags = list(omp)
    if use_cuda:
        macros.append(("FASTPREF_WITH_CUDA", None))
        ext = CUDAExtension(
            "fastpref._C",
            cpu_sources + cuda_sources,
            define_macros=macros,
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "--use_fast_math"]},
            extra_link_args=link_flags,
        )
    else:
        ext = CppExtension(
            "fastpref._C",
            cpu_sources,
            define_macros=macros,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_flags,
        )
    print(f"fastpref: building fastpref._C (cuda={use_cuda}, openmp={bool(omp)})", file=sys.stderr)
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
        "test": ["pytest>=8", "pytest-benchmark>=4", "matplotlib>=3.7", "trl>=1.0"],
    },
    entry_points={"console_scripts": ["fastpref=fastpref.cli:main"]},
    zip_safe=False,
)
