"""Triton kernels of fastpref, shipped as ``fastpref.kernels``. The wheel installs no top-level ``kernels``
package (that name belongs to another project on PyPI, which transformers probes for)."""

if __name__ == "kernels":
    # Reached as a top-level `kernels` only because a source checkout's root is on sys.path (`python -c` or
    # `python -m` run from it). Look like what transformers' package probe calls a shadowing namespace package
    # (no __file__, no version), so it reports the PyPI `kernels` project as absent, and refuse any real use.
    __file__ = None

    def __getattr__(name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        raise ImportError(f"this `kernels` is fastpref's Triton folder, not the PyPI `kernels` package; "
                          f"use fastpref.kernels (asked for {name!r})")
