"""The optional C++/CUDA extension build; the package metadata lives in pyproject.toml."""
from setuptools import setup


# --- optional extension soflow_fast._fused_optim (csrc/: fused AdamW + EMA step) --------------------
# Built when torch is importable at build time (use `pip install --no-build-isolation -e .`; an isolated
# build has no torch and skips it), with its CUDA kernel only under a CUDA build of torch and nvcc.
# A failed compile warns and installs the pure-Python package: optim.py then reports the backend absent.
def _fused_optim_extension():
    import warnings

    try:
        import torch
        from torch.utils import cpp_extension
    except Exception as exc:  # noqa: BLE001 -- torch missing or broken: install without the extension
        print(f"soflow_fast: torch not importable at build time ({exc}); skipping _fused_optim")
        return {}

    class OptionalBuildExt(cpp_extension.BuildExtension):
        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as exc:  # noqa: BLE001 -- a compiler problem must not fail the install
                warnings.warn(f"soflow_fast: building {ext.name} failed, fused_adamw_ema unavailable: {exc}")

    with_cuda = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    sources = ["csrc/fused_adamw_ema.cpp"] + (["csrc/fused_adamw_ema_cuda.cu"] if with_cuda else [])
    make = cpp_extension.CUDAExtension if with_cuda else cpp_extension.CppExtension
    ext = make(
        "soflow_fast._fused_optim",
        sources,
        define_macros=[("WITH_CUDA", None)] if with_cuda else [],
        extra_compile_args={"cxx": ["-O3", "-fopenmp", "-fno-math-errno"], "nvcc": ["-O3"]},
        extra_link_args=["-fopenmp"],
    )
    return {"ext_modules": [ext], "cmdclass": {"build_ext": OptionalBuildExt}}


setup(**_fused_optim_extension())  # everything else is in pyproject.toml
