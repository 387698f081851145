"""soflow_fast: installs the package, maps kernels/ to soflow_fast.kernels."""
from setuptools import find_packages, setup


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


setup(
    name="soflow_fast",
    version="0.1.0",
    description="Fast, exact trainer for SoFlow one-step generative models",
    python_requires=">=3.10",
    packages=find_packages(include=["soflow_fast", "soflow_fast.*"]) + ["soflow_fast.kernels"],
    package_dir={"soflow_fast.kernels": "kernels"},
    package_data={"soflow_fast": ["attention_table.json"]},  # attention: auto's measurements
    install_requires=[
        "torch>=2.4,<2.14",  # users bring their own CUDA build; CI pins 2.13.0 (CPU)
        "numpy>=1.24",
        "pyyaml>=6.0",
        "pillow>=9.0",
        "scikit-learn>=1.2",  # the embedded digits dataset and the digits quality classifier
        "scipy>=1.10",
        "triton>=3.0; platform_system == 'Linux'",  # CI pins 3.7.1 (what CUDA torch 2.13.0 pins)
    ],
    extras_require={
        # GPU-only packages are optional and import-guarded: flash-attn and NVIDIA apex are installed by hand on
        # CUDA machines (the PyPI package named "apex" is unrelated: never install it for this).
        "data": ["nvidia-dali-cuda130>=2.4", "diffusers>=0.30", "h5py>=3.8"],  # DALI runs CPU pipelines too
        "eval": ["tqdm>=4.60"],
        "test": ["pytest>=7", "nvidia-dali-cuda130==2.4.0", "diffusers==0.42.1", "h5py==3.16.0", "tqdm>=4.60"],
    },
    entry_points={"console_scripts": ["soflow-fast=soflow_fast.cli:main"]},
    **_fused_optim_extension(),
)
