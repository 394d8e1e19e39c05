"""Triton kernels of fastpref, shipped as ``fastpref.kernels`` (never as a top-level ``kernels`` package:
that name belongs to another project on PyPI)."""

if __name__ == "kernels":  # imported as the repo folder, not through the fastpref package
    raise ImportError("fastpref's Triton kernels are imported as `fastpref.kernels`, not as `kernels`")
