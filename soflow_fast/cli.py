"""soflow-fast: train | sample | export | import-checkpoint | prepare-latents | convert-latents | evaluate | plot
(also `python -m soflow_fast`)."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import NoReturn, Optional, Sequence

from .errors import RunFailed, UserError, one_line, user_errors

# Modules that still report bad input (a missing file, a malformed checkpoint or data folder) with built-in exception
# types: the commands translate these around the calls that read the user's files, and nowhere else.
FILE_ERRORS = (FileNotFoundError, ValueError)


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line, naming the flag (`--help` shows the usage)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


class _HelpConfig(argparse.Action):
    """--help-config: print every config key (type, default, doc) and exit, like --help."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS,
                         help="list every config key with its type, default and meaning, and exit")

    def __call__(self, parser: argparse.ArgumentParser, *args) -> None:
        from .config import config_help

        print(config_help())
        parser.exit()


def _check_output_dir(path: Path, what: str) -> None:
    """Fail now, naming `what`, when `path` cannot become an output folder: it, or the nearest existing folder above
    it, is a file or not writable (rather than after a model is built, or at the first checkpoint)."""
    existing = next(p for p in (path, *path.parents) if p.exists())
    where = "it" if existing == path else str(existing)
    if not existing.is_dir():
        raise UserError(f"{what}: {where} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{what}: {where} is not writable")


def _train(args: argparse.Namespace) -> int:
    from .config import load_config, parse_override
    from .metrics import run_log
    from .parallel import init_distributed
    from .runlock import RunLock
    from .signals import EXIT_STOPPED
    from .train import Trainer

    overrides = dict(parse_override(s) for s in args.set or [])
    cfg = load_config(args.config, overrides)
    if args.run_dir:
        _check_output_dir(Path(args.run_dir), f"--run-dir {args.run_dir}")
    else:
        _check_output_dir(Path(cfg.working_dir), f"config {args.config}: working_dir = {cfg.working_dir!r}")
    run_dir = Path(args.run_dir or cfg.working_dir)
    with user_errors(ValueError):  # device: cuda without a GPU
        dist = init_distributed(cfg.device)
    # Held from before the run directory is read until the trainer is done: a second trainer stops at once, before
    # it writes anything there (train.log included).
    with RunLock(run_dir, is_main=dist.is_main), run_log(run_dir, enabled=dist.is_main):  # RUN_DIR/train.log
        with user_errors(*FILE_ERRORS):  # the data folder, and the run's checkpoint it resumes from
            trainer = Trainer(cfg, args.run_dir)
        stopped = trainer.fit(max_steps=args.max_steps, progress=not args.no_progress)  # + the digits report
    return EXIT_STOPPED if stopped else 0


def _sample(args: argparse.Namespace) -> int:
    from .checkpoint import consolidate, model_from_checkpoint
    from .flow import Flow
    from .parallel import init_distributed
    from .sampling import generate
    from .vae import load_vae

    _check_output_dir(Path(args.out), f"--out {args.out}")
    with user_errors(*FILE_ERRORS):  # --device cuda without a GPU, the checkpoint, the --vae folder
        dist = init_distributed(args.device)
        ck = consolidate(args.checkpoint)
        model = model_from_checkpoint(ck, "ema" if not args.raw_weights else "model", args.kernels, dist.device)
        vae = load_vae(args.vae, dist.device) if args.vae else None
    labels = None
    if args.labels:
        try:
            labels = [int(v) for v in args.labels.split(",")]
        except ValueError:
            raise UserError(f"--labels {args.labels!r}: expected comma-separated class numbers") from None
        classes = getattr(model.cfg, "num_classes", 0)
        bad = [v for v in labels if not 0 <= v < classes]
        if bad:
            raise UserError(f"--labels: {bad[0]} is outside 0..{classes - 1}")
    path = generate(model, Flow(**ck["flow"]), Path(args.out), num=args.num_samples, nfe=args.nfe, seed=args.seed,
                    batch_size=args.batch_size, dist=dist, labels=labels, vae=vae)
    if path is not None:
        print(f"wrote {args.num_samples} samples to {path} (arr_0 uint8 NHWC) and {path.with_suffix('.png')}")
    return 0


def _import(args: argparse.Namespace) -> int:
    from .config import TrainConfig, load_config
    from .convert import import_reference_checkpoint

    # The reference YAML gives the flow and the classes; its DataLoader keys, which train rejects, do not matter here.
    loader_keys = {key: getattr(TrainConfig, key) for key in ("num_workers", "prefetch_factor")}
    cfg = load_config(args.config, loader_keys) if args.config else None
    ck = import_reference_checkpoint(args.reference, args.out, cfg, args.num_classes, args.num_heads)
    print(f"imported {args.reference} ({ck['model_config']['kind']}, step {ck['step']}) -> {args.out}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from .checkpoint import atomic_save, consolidate
    from .export import export_safetensors

    if args.raw_weights and args.format == "pt":
        raise UserError("--raw-weights: a .pt export keeps both the model and the EMA weights; the flag chooses the "
                        "one set of --format safetensors")
    if args.format == "safetensors":
        _check_output_dir(Path(args.out), f"out {args.out}")
    with user_errors(*FILE_ERRORS):
        ck = consolidate(args.checkpoint)
        if args.format == "safetensors":
            weights = "model" if args.raw_weights else "ema"
            export_safetensors(ck, args.out, weights)
            print(f"exported step {ck['step']} ({weights} weights) -> {args.out}/model.safetensors + config.json")
            return 0
    atomic_save(ck, args.out)
    print(f"exported step {ck['step']} (model and EMA weights, consolidated) -> {args.out}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from .evaluation.fid import NpzImages, evaluate_npz, reference_stats
    from .evaluation.inception import load_inception
    from .parallel import resolve_device

    if args.samples is None and args.save_ref_stats is None:
        raise UserError("give a samples .npz to score, or --save-ref-stats to only compute the reference statistics")
    progress = not args.no_progress
    with user_errors(*FILE_ERRORS):  # evaluation/ names the samples, reference or weights file at fault
        if args.samples is not None:
            NpzImages(args.samples)  # validates arr_0 from its header: a bad file fails before the reference pass
        extractor = load_inception(args.inception, resolve_device(args.device))
        ref = reference_stats(args.ref, extractor, args.batch_size, progress)
        if args.save_ref_stats:
            ref.save(args.save_ref_stats)
            print(f"wrote reference statistics of {args.ref} to {args.save_ref_stats}", file=sys.stderr)
        if args.samples is None:
            return 0
        scores = evaluate_npz(args.samples, ref, extractor, args.batch_size, progress)
    result = {"samples": str(args.samples), "reference": str(args.ref), **scores}
    text = json.dumps(result)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0


def _plot(args: argparse.Namespace) -> int:
    from .evaluation.plot import plot_metrics

    with user_errors(*FILE_ERRORS):  # a run directory without (plottable) metrics.jsonl
        out = plot_metrics(args.run_dir, args.out)
    print(f"wrote {out}")
    return 0


def _prepare_latents(args: argparse.Namespace) -> int:
    from .data.prepare import PrepareError, prepare_latents
    from .parallel import resolve_device

    with user_errors(ValueError):  # --device cuda without a GPU
        device = resolve_device(args.device)
    with user_errors(PrepareError):
        m = prepare_latents(args.images, args.out, args.vae, image_size=args.image_size, shard_size=args.shard_size,
                            dtype=args.dtype, batch_size=args.batch_size, on_error=args.on_error, device=device,
                            num_threads=args.num_threads)
    if m is not None:
        print(f"wrote {m['count']} latents {m['sample_shape']} ({m['dtype']}) in {len(m['shards'])} shards to "
              f"{args.out}" + (f"; {len(m['skipped'])} images skipped (see manifest.json)" if m["skipped"] else ""))
    return 0


def _convert_latents(args: argparse.Namespace) -> int:
    from .data.prepare import PrepareError, convert_hdf5

    with user_errors(PrepareError):
        m = convert_hdf5(args.hdf5, args.out, shard_size=args.shard_size, dtype=args.dtype,
                         num_classes=args.num_classes)
    print(f"converted {m['count']} latents {m['sample_shape']} ({m['dtype']}) into {len(m['shards'])} shards in "
          f"{args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="soflow-fast", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train (or resume) a SoFlow model from a YAML config",
                       description="Train a SoFlow model. Re-running on an existing run directory resumes from its "
                                   "latest checkpoint (or resume_from). SIGTERM, SIGINT or SIGUSR1 save a checkpoint "
                                   "at the next step and exit with status 143; a user error exits 2, a diverged run "
                                   "1 (docs/cluster.md).")
    t.add_argument("config", help="YAML config (reference imagenet.yaml keys are accepted; see configs/)")
    t.add_argument("--help-config", action=_HelpConfig)
    t.add_argument("--run-dir", help="run directory (default: the config's working_dir)")
    t.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config key (value parsed as YAML); repeatable")
    t.add_argument("--max-steps", type=_positive_int, help="stop after this many finished steps (default: total_steps)")
    t.add_argument("--no-progress", action="store_true", help="no console progress bar")
    t.set_defaults(func=_train)

    s = sub.add_parser("sample", help="N-NFE samples from a checkpoint as a PNG grid and an ADM-layout .npz",
                       description="Draw samples from a soflow_fast checkpoint (EMA weights unless --raw-weights). "
                                   "Runs under torchrun (ranks take disjoint chunks), deterministic per seed whatever "
                                   "the world size, and resumable (finished chunks are kept and skipped).")
    s.add_argument("checkpoint", help="a consolidated .pt, a safetensors export folder, a training checkpoint "
                                      "directory, or a run directory (its latest checkpoint)")
    s.add_argument("--out", required=True, help="output folder for samples_<N>nfe.npz (arr_0: uint8 NHWC) and .png")
    s.add_argument("--num-samples", type=_positive_int, default=100, help="number of samples (default 100)")
    s.add_argument("--nfe", type=_positive_int, default=1, help="network evaluations per sample (default 1)")
    s.add_argument("--labels", help="comma-separated class labels, cycled (default: uniformly random)")
    s.add_argument("--seed", type=int, default=0, help="seed of noise and random labels (default 0)")
    s.add_argument("--batch-size", type=_positive_int, default=256,
                   help="samples per network call and per resumable chunk (default 256); keep it fixed to resume")
    s.add_argument("--vae", help="a LOCAL diffusers AutoencoderKL folder to decode latent models (e.g. sd-vae-ft-mse)")
    s.add_argument("--raw-weights", action="store_true", help="use the raw (non-EMA) weights")
    s.add_argument("--kernels", default="auto", choices=["auto", "triton", "eager"], help="op implementation")
    s.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="device (default auto)")
    s.set_defaults(func=_sample)

    e = sub.add_parser("export", help="consolidate a (sharded) training checkpoint into one .pt file, or safetensors",
                       description="Gather the model and EMA weights of a training checkpoint (any world size) into "
                                   "a single-file checkpoint that `sample` reads; or, with --format safetensors, the "
                                   "EMA weights (--raw-weights: the raw ones) as OUT/model.safetensors with "
                                   "OUT/config.json, a folder that `sample` also reads.")
    e.add_argument("checkpoint", help="a training checkpoint directory, or a run directory (its latest checkpoint)")
    e.add_argument("out", help="output .pt path (--format pt) or folder (--format safetensors)")
    e.add_argument("--format", default="pt", choices=["pt", "safetensors"], help="output format (default pt)")
    e.add_argument("--raw-weights", action="store_true", help="safetensors: the raw weights instead of the EMA")
    e.set_defaults(func=_export)

    i = sub.add_parser("import-checkpoint", help="convert a reference SoFlow checkpoint into ours",
                       description="Convert a zlab-princeton/SoFlow checkpoint (model/ema_model with 'network.' keys) "
                                   "into a soflow_fast checkpoint that `sample` reads and `train` starts from "
                                   "(config key init_from).")
    i.add_argument("reference", help="the reference checkpoint (.pt)")
    i.add_argument("out", help="output path of the soflow_fast checkpoint")
    i.add_argument("--config", help="the reference YAML the model was trained with (path and coefficient types)")
    i.add_argument("--num-classes", type=int, default=1000, help="classes of the label table (default 1000)")
    i.add_argument("--num-heads", type=int, help="attention heads (default: from the size table)")
    i.set_defaults(func=_import)

    ev = sub.add_parser("evaluate", help="FID, sFID, Inception Score, precision and recall of an .npz of samples "
                                         "(ADM evaluator numbers)",
                        description="Score arr_0 (uint8 NHWC) of a samples .npz against a reference: an ADM reference "
                                    "batch / statistics .npz (mu, sigma[, mu_s, sigma_s, pool]; e.g. "
                                    "VIRTUAL_imagenet256_labeled.npz), or real images (.npz arr_0 or a folder). "
                                    "Precision and recall need the reference's pool features: from its images (an "
                                    "ADM batch's arr_0) or a file saved with --save-ref-stats. Prints one JSON line. "
                                    "Inception-v3 weights come from a local file; nothing is downloaded.")
    ev.add_argument("samples", nargs="?", help="samples .npz (arr_0: uint8 [N, H, W, 3])")
    ev.add_argument("--ref", required=True, help="reference: statistics .npz, images .npz, or a folder of images")
    ev.add_argument("--inception", required=True, metavar="WEIGHTS",
                    help="local FID Inception-v3 weights: pt_inception-2015-12-05-6726825d.pth (pytorch-fid) or "
                         "weights-inception-2015-12-05-6726825d.pth (torch-fidelity)")
    ev.add_argument("--batch-size", type=int, default=100, help="images per Inception call (default 100)")
    ev.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="device (default auto)")
    ev.add_argument("--save-ref-stats", metavar="NPZ",
                    help="also write the reference statistics (ADM layout, plus its pool features) here")
    ev.add_argument("--out", help="also write the JSON result to this file")
    ev.add_argument("--no-progress", action="store_true", help="no progress bar")
    ev.set_defaults(func=_evaluate)

    pl = sub.add_parser("plot", help="plot loss terms, FID and images/s of a run (RUN_DIR/metrics.jsonl) as a PNG",
                        description="Draw RUN_DIR/metrics.jsonl (losses, mse, grad norm, images/s, FID when logged) "
                                    "over steps into a PNG.")
    pl.add_argument("run_dir", help="run directory holding metrics.jsonl")
    pl.add_argument("--out", help="output PNG (default RUN_DIR/metrics.png)")
    pl.set_defaults(func=_plot)

    pr = sub.add_parser("prepare-latents", help="encode an ImageFolder into sharded SD-VAE latents (DALI decode)",
                        description="Decode (DALI), ADM center crop, encode with a local diffusers AutoencoderKL; "
                                    "store posterior mean and std in .npy shards with manifest.json. Resumes from "
                                    "complete shards; under torchrun each rank takes every world_size-th shard.")
    pr.add_argument("images", help="ImageFolder: one sub-folder per class with JPEG/PNG files")
    pr.add_argument("out", help="output latent directory")
    pr.add_argument("--vae", required=True, help="local diffusers AutoencoderKL folder (e.g. a copy of sd-vae-ft-mse)")
    pr.add_argument("--image-size", type=int, default=256, help="crop size in pixels, 256 or 512 (default 256)")
    pr.add_argument("--shard-size", type=int, default=1024, help="latents per shard (default 1024)")
    pr.add_argument("--dtype", default="float16", choices=["float16", "float32"], help="shard dtype (default float16)")
    pr.add_argument("--batch-size", type=int, default=64, help="images per decode/encode batch (default 64)")
    pr.add_argument("--on-error", default="stop", choices=["stop", "skip"],
                    help="an unreadable image: stop, or skip it with a warning (recorded in the manifest)")
    pr.add_argument("--num-threads", type=int, default=4, help="DALI CPU threads (default 4)")
    pr.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="device (default auto)")
    pr.set_defaults(func=_prepare_latents)

    cv = sub.add_parser("convert-latents", help="import the reference implementation's imagenet_latent.hdf5",
                        description="Convert imagenet_latent.hdf5 (latents [N, 8, h, w], labels, amount, latent_size) "
                                    "into the shard format of prepare-latents. Needs h5py.")
    cv.add_argument("hdf5", help="imagenet_latent.hdf5 (or the folder holding it)")
    cv.add_argument("out", help="output latent directory")
    cv.add_argument("--shard-size", type=int, default=1024, help="latents per shard (default 1024)")
    cv.add_argument("--dtype", default="float32", choices=["float16", "float32"], help="shard dtype (default float32)")
    cv.add_argument("--num-classes", type=int, help="label classes (default: largest label + 1)")
    cv.set_defaults(func=_convert_latents)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (UserError, RunFailed) as e:  # anything else is a bug: its traceback is shown
        print(f"soflow-fast {args.command}: error: {one_line(e)}", file=sys.stderr)
        return 2 if isinstance(e, UserError) else 1
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
