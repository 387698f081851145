"""soflow_fast: installs the package, maps kernels/ to soflow_fast.kernels."""
from setuptools import setup

setup(
    name="soflow_fast",
    version="0.1.0",
    description="Fast, exact trainer for SoFlow one-step generative models",
    python_requires=">=3.10",
    packages=["soflow_fast", "soflow_fast.models", "soflow_fast.kernels"],
    package_dir={"soflow_fast.kernels": "kernels"},
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
        "triton": ["triton>=3.0"],
        "test": ["pytest>=7", "triton>=3.0"],
    },
    entry_points={"console_scripts": ["soflow-fast=soflow_fast.cli:main"]},
)
