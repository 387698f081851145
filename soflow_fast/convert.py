"""Import a checkpoint of the reference implementation (zlab-princeton/SoFlow) as a soflow_fast checkpoint that
`sample` and `train` read: both weight sets checked against the rebuilt network before anything is written."""
from __future__ import annotations

import os
from typing import Optional

from torch import nn

from .checkpoint import FORMAT, atomic_save, load_state_strict, read_checkpoint
from .config import TrainConfig
from .errors import user_errors
from .flow import Flow
from .models import DiT, build_unet, describe
from .models.reference import infer_dit_config, strip_reference_prefix


def _read_reference(path: str | os.PathLike, num_classes: int, num_heads: Optional[int]
                    ) -> tuple[dict, nn.Module, dict, dict]:
    """(the raw checkpoint, the network its weights fit, model weights, EMA weights)."""
    ref = read_checkpoint(path)
    for key in ("model", "ema_model"):
        if key not in ref:
            raise KeyError(f"checkpoint {path}: no {key!r} entry; not a reference SoFlow checkpoint")
    model = strip_reference_prefix(ref["model"], f"checkpoint {path} [model]")
    ema = strip_reference_prefix(ref["ema_model"], f"checkpoint {path} [ema_model]")
    if any(k.startswith("enc.") for k in model):  # the reference's CIFAR-10 U-Net (one fixed architecture)
        net = build_unet("UNet")
    else:
        net = DiT(infer_dit_config(model, num_classes, num_heads))
    for name, state in (("model", model), ("ema_model", ema)):  # check both fit before anything is written
        load_state_strict(net, state, f"checkpoint {path} [{name}]")
    return ref, net, model, ema


def import_reference_checkpoint(reference: str | os.PathLike, out: str | os.PathLike,
                                cfg: Optional[TrainConfig] = None, num_classes: int = 1000,
                                num_heads: Optional[int] = None) -> dict:
    """Write `reference` as a soflow_fast checkpoint at `out` and return it. `cfg`: the reference YAML the model was
    trained with (its flow and num_classes win); without it the flow is Linear/Euler. A file that is not a reference
    checkpoint, or weights that fit no network, raise UserError naming the file."""
    if cfg is not None and cfg.num_classes is not None:
        num_classes = cfg.num_classes
    # models/reference.py names the file in FileNotFoundError / ValueError / KeyError messages
    with user_errors(FileNotFoundError, ValueError, KeyError):
        ref, net, model, ema = _read_reference(reference, num_classes, num_heads)
    flow = cfg.flow if cfg is not None else Flow()  # Flow's defaults are the reference's: Linear, Euler
    ck = {"format": FORMAT, "model": model, "ema": ema, "step": int(ref.get("finished_steps", 0)),
          "model_config": describe(net), "flow": {"noising": flow.noising, "coefficient": flow.coefficient},
          "config": cfg.to_dict() if cfg is not None else None, "imported_from": str(reference)}
    atomic_save(ck, out)
    return ck
