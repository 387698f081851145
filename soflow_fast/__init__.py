"""soflow_fast: a fast, exact trainer for SoFlow one-step generative models."""
from .flow import Flow, sample
from .models import build_model

__version__ = "0.1.0"
__all__ = ["Flow", "build_model", "sample", "__version__"]
