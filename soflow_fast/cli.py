"""soflow-fast: train | sample | import-checkpoint (also `python -m soflow_fast`)."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch


def _train(args: argparse.Namespace) -> int:
    from .config import load_config, parse_override
    from .train import Trainer

    overrides = dict(parse_override(s) for s in args.set or [])
    cfg = load_config(args.config, overrides)
    trainer = Trainer(cfg, args.run_dir)
    trainer.fit(max_steps=args.max_steps, progress=not args.no_progress)
    if cfg.dataset_type == "digits" and cfg.quality_report and trainer.step >= cfg.total_steps:
        from .evaluation.digits_quality import run_quality_report

        run_quality_report(trainer)
    return 0


def _sample(args: argparse.Namespace) -> int:
    from .checkpoint import load_checkpoint
    from .flow import Flow, sample
    from .images import save_grid, save_npz, to_uint8_nhwc
    from .train import model_from_checkpoint, resolve_device

    device = resolve_device(args.device)
    ck = load_checkpoint(args.checkpoint)
    model = model_from_checkpoint(ck, "ema" if not args.raw_weights else "model", args.kernels, device)
    flow = Flow(**ck["flow"])
    mc = model.cfg
    g = torch.Generator(device).manual_seed(args.seed)
    if mc.num_classes:
        if args.labels:
            labels = [int(v) for v in args.labels.split(",")]
            bad = [v for v in labels if not 0 <= v < mc.num_classes]
            if bad:
                raise SystemExit(f"--labels: {bad[0]} is outside 0..{mc.num_classes - 1}")
            y_all = torch.tensor(labels * (args.num // len(labels) + 1), device=device)[:args.num]
        else:
            y_all = torch.randint(0, mc.num_classes, (args.num,), generator=g, device=device)
    else:
        y_all = None
    images = []
    for start in range(0, args.num, args.batch_size):
        n = min(args.batch_size, args.num - start)
        x1 = torch.randn((n, mc.in_channels, mc.input_size, mc.input_size), generator=g, device=device)
        y = None if y_all is None else y_all[start:start + n]
        images.append(to_uint8_nhwc(sample(model, flow, x1, nfe=args.nfe, y=y, generator=g)))
    arr = np.concatenate(images)
    out = Path(args.out)
    labels_np = None if y_all is None else y_all.cpu().numpy()
    save_npz(arr, out / f"samples_{args.nfe}nfe.npz", labels_np)
    cols = min(args.num, 10)
    save_grid(arr, (min(args.num, 100) + cols - 1) // cols, cols, out / f"samples_{args.nfe}nfe.png",
              upscale=4 if mc.input_size <= 16 else 1)
    print(f"wrote {len(arr)} samples to {out}/samples_{args.nfe}nfe.npz and .png")
    return 0


def _import(args: argparse.Namespace) -> int:
    from .checkpoint import FORMAT, atomic_save
    from .config import load_config
    from .models.reference import infer_dit_config, read_checkpoint, strip_reference_prefix

    ref = read_checkpoint(args.reference)
    for key in ("model", "ema_model"):
        if key not in ref:
            raise SystemExit(f"checkpoint {args.reference}: no {key!r} entry; not a reference SoFlow checkpoint")
    model = strip_reference_prefix(ref["model"], f"checkpoint {args.reference} [model]")
    ema = strip_reference_prefix(ref["ema_model"], f"checkpoint {args.reference} [ema_model]")
    cfg = load_config(args.config) if args.config else None
    num_classes = args.num_classes if cfg is None or cfg.num_classes is None else cfg.num_classes
    mcfg = infer_dit_config(model, num_classes, args.num_heads)
    from .models import DiT
    from .models.reference import load_state_strict

    for name, state in (("model", model), ("ema_model", ema)):  # check both fit before anything is written
        load_state_strict(DiT(mcfg), state, f"checkpoint {args.reference} [{name}]")
    flow = {"noising": cfg.flow.noising, "coefficient": cfg.flow.coefficient} if cfg else \
        {"noising": "linear", "coefficient": "euler"}
    out = {"format": FORMAT, "model": model, "ema": ema, "step": int(ref.get("finished_steps", 0)),
           "model_config": {k: v for k, v in mcfg.__dict__.items() if k != "kernels"}, "flow": flow,
           "config": cfg.to_dict() if cfg else None, "imported_from": str(args.reference)}
    atomic_save(out, args.out)
    print(f"imported {args.reference} (step {out['step']}, {mcfg.depth} blocks, hidden {mcfg.hidden_size}, "
          f"{'with' if mcfg.null_class else 'without'} null label) -> {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="soflow-fast", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train (or resume) a SoFlow model from a YAML config",
                       description="Train a SoFlow model. Re-running on an existing run directory resumes from its "
                                   "latest checkpoint.")
    t.add_argument("config", help="YAML config (reference imagenet.yaml keys are accepted; see configs/)")
    t.add_argument("--run-dir", help="run directory (default: the config's working_dir)")
    t.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config key (value parsed as YAML); repeatable")
    t.add_argument("--max-steps", type=int, help="stop after this many finished steps (default: total_steps)")
    t.add_argument("--no-progress", action="store_true", help="no console progress bar")
    t.set_defaults(func=_train)

    s = sub.add_parser("sample", help="N-NFE samples from a checkpoint as a PNG grid and an ADM-layout .npz",
                       description="Draw samples from a soflow_fast checkpoint (EMA weights unless --raw-weights).")
    s.add_argument("checkpoint", help="a soflow_fast checkpoint (.pt)")
    s.add_argument("--out", required=True, help="output folder for samples_<N>nfe.npz (arr_0: uint8 NHWC) and .png")
    s.add_argument("--num", type=int, default=100, help="number of samples (default 100)")
    s.add_argument("--nfe", type=int, default=1, help="network evaluations per sample (default 1)")
    s.add_argument("--labels", help="comma-separated class labels, cycled (default: uniformly random)")
    s.add_argument("--seed", type=int, default=0, help="seed of noise and random labels (default 0)")
    s.add_argument("--batch-size", type=int, default=256, help="samples per network call (default 256)")
    s.add_argument("--raw-weights", action="store_true", help="use the raw (non-EMA) weights")
    s.add_argument("--kernels", default="auto", choices=["auto", "triton", "eager"], help="op implementation")
    s.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="device (default auto)")
    s.set_defaults(func=_sample)

    i = sub.add_parser("import-checkpoint", help="convert a reference SoFlow checkpoint into ours",
                       description="Convert a zlab-princeton/SoFlow checkpoint (model/ema_model with 'network.' keys) "
                                   "into a soflow_fast checkpoint that `sample` and `train` read.")
    i.add_argument("reference", help="the reference checkpoint (.pt)")
    i.add_argument("out", help="output path of the soflow_fast checkpoint")
    i.add_argument("--config", help="the reference YAML the model was trained with (path and coefficient types)")
    i.add_argument("--num-classes", type=int, default=1000, help="classes of the label table (default 1000)")
    i.add_argument("--num-heads", type=int, help="attention heads (default: from the size table)")
    i.set_defaults(func=_import)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S")
    args = build_parser().parse_args(argv)
    from .config import ConfigError

    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError, KeyError, ValueError) as e:
        print(f"soflow-fast {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
