"""`soflow-fast export --format safetensors`: one set of weights as OUT/model.safetensors, with OUT/config.json
beside it describing the network (models.describe), the flow and the step, so that `sample` and
checkpoint.model_from_checkpoint read the folder back (checkpoint.consolidate dispatches here).

The weights are the EMA ones by default (what `sample` uses), the raw ones with --raw-weights; the folder holds only
that set, and asking it for the other is an error naming the folder. safetensors is an optional package (the
[export] extra); without it both directions fail with one line saying so.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .fileio import atomic_open

WEIGHTS_FILE, CONFIG_FILE = "model.safetensors", "config.json"
FORMAT = "soflow_fast-safetensors/1"


def _safetensors() -> Any:
    try:
        import safetensors.torch
    except ImportError:
        raise ValueError("--format safetensors needs the safetensors package (pip install safetensors, or "
                         "pip install 'soflow_fast[export]')") from None
    return safetensors.torch


def is_safetensors_export(path: str | os.PathLike) -> bool:
    return (Path(path) / CONFIG_FILE).is_file() and (Path(path) / WEIGHTS_FILE).is_file()


def export_safetensors(ck: dict, out: str | os.PathLike, weights: str = "ema") -> Path:
    """Write ck[weights] (a consolidated checkpoint's 'ema' or 'model') and its config.json into the folder `out`."""
    st = _safetensors()
    out = Path(out)
    state = {k: v.detach().contiguous().clone() for k, v in ck[weights].items()}  # no shared storage in the file
    with atomic_open(out / WEIGHTS_FILE) as fh:
        fh.write(st.save(state, metadata={"format": FORMAT, "weights": weights}))
    config = {"format": FORMAT, "weights": weights, "step": ck["step"], "model_config": ck["model_config"],
              "flow": ck["flow"], "train_config": ck.get("config")}
    with atomic_open(out / CONFIG_FILE, "w") as fh:
        json.dump(config, fh, indent=1)
    return out


def load_safetensors_export(path: str | os.PathLike) -> dict:
    """The consolidated-checkpoint dict of an exported folder (only its one set of weights, under its name)."""
    st, path = _safetensors(), Path(path)
    try:
        config = json.loads((path / CONFIG_FILE).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"checkpoint {path / CONFIG_FILE}: cannot be read ({e})") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise ValueError(f"checkpoint {path / CONFIG_FILE}: not a {FORMAT} config")
    try:
        state = st.load_file(str(path / WEIGHTS_FILE))
    except Exception as e:  # safetensors' own error types: a truncated or foreign file
        raise ValueError(f"checkpoint {path / WEIGHTS_FILE}: cannot be read as safetensors ({e})") from None
    from .checkpoint import FORMAT as CHECKPOINT_FORMAT

    return {"format": CHECKPOINT_FORMAT, config["weights"]: state, "step": config["step"],
            "model_config": config["model_config"], "flow": config["flow"], "config": config.get("train_config")}
