"""`agepipe <stage>`: the command line. It parses arguments and calls the library."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from agepipe import config
from agepipe.cluster import ClusterUnreachable
from agepipe.storage import StorageError

COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Callable]] = {}


def command(name: str, add_arguments: Callable[[argparse.ArgumentParser], None]) -> Callable:
    def register(run: Callable[[argparse.Namespace], int]) -> Callable:
        COMMANDS[name] = (add_arguments, run)
        return run

    return register


def add_crop_settings(parser: argparse.ArgumentParser) -> None:
    """Detector and crop options shared by crop, score and serve."""
    from agepipe.detectors import DETECTORS
    from agepipe.faces import CROP_GEOMETRIES

    group = parser.add_argument_group("face detection and cropping")
    group.add_argument("--detector", choices=sorted(DETECTORS), help="face detector")
    group.add_argument("--detector-weights", help="detector weights: a path or URI")
    group.add_argument("--min-score", type=float, help="detector confidence threshold")
    group.add_argument("--all-faces", action="store_true", default=None, help="every face, not only the largest")
    group.add_argument("--geometry", choices=sorted(CROP_GEOMETRIES), help="how a face is placed in its crop")
    group.add_argument("--margin", type=float, help="margin around the face box, fraction of its size")
    group.add_argument("--size", type=int, help="crop side in pixels")


def crop_overrides(args: argparse.Namespace, prefix: str = "crop.") -> dict:
    """The crop flags as dotted settings keys (None where a flag was not given)."""
    names = ("detector", "detector_weights", "min_score", "all_faces", "geometry", "margin", "size")
    return {prefix + name: getattr(args, name) for name in names}


def given_crop_overrides(args: argparse.Namespace) -> dict | None:
    """Only the crop flags that were given, for a model's recorded crop settings; None if none were."""
    return {k: v for k, v in crop_overrides(args, prefix="").items() if v is not None} or None


def add_crop_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", required=True, help="folder or s3:// prefix of images (recursive)")
    parser.add_argument("--output", required=True, help="folder or s3:// prefix for the Parquet dataset")
    parser.add_argument("--labels", help="utkface, imdb, none (default), or a CSV/Parquet table URI")
    parser.add_argument("--max-age", type=float, help="cap ages at this value (default 100)")
    parser.add_argument("--encoding", choices=["jpeg", "png"], help="crop encoding (default jpeg q95)")
    parser.add_argument("--batch-size", type=int, help="images per batch, written as one Parquet file")
    parser.add_argument("--concurrency", type=int, help="detector actors (default: one per CPU)")
    add_crop_settings(parser)


@command("crop", add_crop_arguments)
def run_crop_command(args: argparse.Namespace) -> int:
    from agepipe.crop import run_crop

    settings = config.load(
        config.CropJobSettings,
        args.config,
        input=args.input,
        output=args.output,
        batch_size=args.batch_size,
        concurrency=args.concurrency,
        **{"labels.kind": args.labels, "labels.max_age": args.max_age, "crop.encoding": args.encoding},
        **crop_overrides(args),
    )
    summary = run_crop(settings)
    print(summary.render("crop"))
    return 0


def add_flip_tta_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--flip-tta",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also run each face mirrored and average the two (twice the model time; default off)",
    )


def add_score_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", required=True, help="folder or s3:// prefix of images (recursive)")
    parser.add_argument("--output", required=True, help="folder or s3:// prefix for the predictions Parquet")
    parser.add_argument("--model", help="checkpoint path or URI (default: the bundled default model)")
    parser.add_argument("--labels", help="add label_* columns: utkface, imdb, or a CSV/Parquet table URI")
    parser.add_argument("--batch-size", type=int, help="images per batch")
    parser.add_argument("--concurrency", type=int, help="scoring actors (default: one per CPU)")
    parser.add_argument(
        "--largest-face-only", action="store_true", default=None, help="score only the largest face of each image"
    )
    add_flip_tta_argument(parser)
    parser.add_argument("--runtime", choices=["onnx", "torch"], help="onnx (CPU default) or torch (GPU default)")
    add_crop_settings(parser)


@command("score", add_score_arguments)
def run_score_command(args: argparse.Namespace) -> int:
    from agepipe.score import run_score

    settings = config.load(
        config.ScoreSettings,
        args.config,
        input=args.input,
        output=args.output,
        model=args.model,
        batch_size=args.batch_size,
        concurrency=args.concurrency,
        flip_tta=args.flip_tta,
        runtime=args.runtime,
        largest_face_only=args.largest_face_only,
        crop_overrides=given_crop_overrides(args),
        **{"labels.kind": args.labels},
    )
    summary = run_score(settings)
    print(summary.render("score"))
    return 0


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    from agepipe.augment import AUGMENTATIONS

    parser.add_argument("--data", required=True, help="the crop job's Parquet dataset (path or s3://)")
    parser.add_argument("--output", required=True, help="run folder (path or s3://): checkpoints, metrics")
    parser.add_argument("--backbone", help="timm model name (default efficientnet_lite0)")
    parser.add_argument("--pretrained", help="default, hub, none, or a weights path/URI")
    parser.add_argument("--age-head", choices=["distribution", "regression"])
    parser.add_argument("--image-size", type=int)
    parser.add_argument(
        "--augmentation", choices=sorted(AUGMENTATIONS), help="training augmentation (augment.AUGMENTATIONS)"
    )
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--phase1-epochs", type=int)
    parser.add_argument("--phase2-epochs", type=int)
    parser.add_argument("--phase1-lr", type=float)
    parser.add_argument("--phase2-lr", type=float)
    parser.add_argument("--lr-schedule", choices=["cosine", "plateau"], help="per-phase learning-rate schedule")
    parser.add_argument("--warmup-epochs", type=float, help="learning-rate ramp at the start of phase 2, in epochs")
    parser.add_argument("--unfreeze-stages", type=int, help="backbone stages trained in phase 2")
    parser.add_argument(
        "--train-batchnorm",
        dest="freeze_batchnorm",
        action="store_false",
        default=None,
        help="phase 2 also trains the unfrozen stages' BatchNorm (default: kept frozen)",
    )
    parser.add_argument("--patience", type=int, help="early-stopping patience in epochs")
    parser.add_argument("--limit", type=int, help="use at most this many faces (quick runs)")
    parser.add_argument("--num-workers", type=int, help="Ray Train workers (DDP)")
    parser.add_argument(
        "--cpus-per-worker", type=float, help="CPUs each worker reserves (unset: the cluster's CPUs less one, shared)"
    )
    parser.add_argument("--use-gpu", action="store_true", default=None)
    parser.add_argument("--seed", type=int)


TRAIN_FLAGS = (
    "data",
    "output",
    "backbone",
    "age_head",
    "image_size",
    "augmentation",
    "batch_size",
    "phase1_epochs",
    "phase2_epochs",
    "phase1_lr",
    "phase2_lr",
    "lr_schedule",
    "warmup_epochs",
    "unfreeze_stages",
    "freeze_batchnorm",
    "patience",
    "limit",
    "num_workers",
    "cpus_per_worker",
    "use_gpu",
    "seed",
)


def train_settings(args: argparse.Namespace) -> config.TrainSettings:
    overrides = {name: getattr(args, name) for name in TRAIN_FLAGS if hasattr(args, name)}
    if args.pretrained not in (None, "none"):
        overrides["pretrained"] = args.pretrained
    settings = config.load(config.TrainSettings, args.config, **overrides)
    if args.pretrained == "none":
        settings.pretrained = None  # set after loading: a None override counts as not given
    return settings


@command("train", add_train_arguments)
def run_train_command(args: argparse.Namespace) -> int:
    from agepipe.train import run_training

    result = run_training(train_settings(args))
    print(f"train: {result}")
    return 0


def add_evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--predictions", required=True, help="the scoring job's Parquet dataset (or s3://)")
    parser.add_argument("--output", required=True, help="folder or s3:// prefix for report, plots, metrics")
    parser.add_argument(
        "--labels",
        help="labels from paths: utkface, imdb, or a CSV/Parquet table URI (default: the label_* columns)",
    )
    parser.add_argument("--max-age", type=float, help="cap label ages at this value (default 100)")
    parser.add_argument("--run", help="training run folder: adds its training curves (metrics.csv)")
    parser.add_argument("--model", help="checkpoint that scored the predictions, for Grad-CAM (default one)")
    parser.add_argument("--gradcam-faces", type=int, help="faces in the Grad-CAM grid (0: none; default 8)")
    parser.add_argument("--seed", type=int, help="seed for the Grad-CAM and scatter samples")
    add_crop_settings(parser)


@command("evaluate", add_evaluate_arguments)
def run_evaluate_command(args: argparse.Namespace) -> int:
    from agepipe.evaluate import run_evaluate

    settings = config.load(
        config.EvaluateSettings,
        args.config,
        predictions=args.predictions,
        output=args.output,
        run=args.run,
        model=args.model,
        gradcam_faces=args.gradcam_faces,
        seed=args.seed,
        crop_overrides=given_crop_overrides(args),
        **{"labels.kind": args.labels, "labels.max_age": args.max_age},
    )
    result = run_evaluate(settings)
    metrics = result["metrics"]
    mae = f", MAE {metrics['age']['mae']:.2f} years" if metrics and metrics["age"]["mae"] is not None else ""
    print(f"evaluate: {result['coverage']['faces']} faces{mae}; report at {result['report']}")
    return 0


def add_tune_arguments(parser: argparse.ArgumentParser) -> None:
    add_train_arguments(parser)
    parser.add_argument("--num-samples", type=int, help="trials to run (default 8)")
    parser.add_argument("--max-concurrent-trials", type=int, help="default: as many as the CPUs allow")


@command("tune", add_tune_arguments)
def run_tune_command(args: argparse.Namespace) -> int:
    from agepipe.tune import run_tune

    settings = config.TuneSettings(train=train_settings(args))
    config.apply_overrides(
        settings, {"num_samples": args.num_samples, "max_concurrent_trials": args.max_concurrent_trials}
    )
    print(f"tune: {run_tune(settings)}")
    return 0


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="checkpoint path or URI (default: the bundled default model)")
    parser.add_argument("--host", help="address to listen on (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, help="HTTP port (default 8000)")
    parser.add_argument("--max-body-bytes", type=int, help="largest accepted upload (default 10 MiB)")
    parser.add_argument("--batch-size", type=int, help="most requests per batched forward pass")
    parser.add_argument("--max-replicas", type=int, help="autoscaling upper bound")
    add_flip_tta_argument(parser)
    parser.add_argument("--runtime", choices=["onnx", "torch"], help="onnx (CPU default) or torch (GPU default)")
    add_crop_settings(parser)


@command("serve", add_serve_arguments)
def run_serve_command(args: argparse.Namespace) -> int:
    from agepipe.serve import run_server

    settings = config.load(
        config.ServeSettings,
        args.config,
        model=args.model,
        host=args.host,
        port=args.port,
        max_body_bytes=args.max_body_bytes,
        batch_size=args.batch_size,
        max_replicas=args.max_replicas,
        flip_tta=args.flip_tta,
        runtime=args.runtime,
    )
    settings.crop_overrides.update(given_crop_overrides(args) or {})
    run_server(settings)
    return 0


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="checkpoint to export (path or URI)")
    parser.add_argument("--output", required=True, help="where to write the shareable checkpoint")
    parser.add_argument("--full-precision", action="store_true", help="keep float32 weights (default fp16)")


@command("export", add_export_arguments)
def run_export_command(args: argparse.Namespace) -> int:
    from agepipe.model import export_for_sharing

    crop = export_for_sharing(args.model, args.output, half=not args.full_precision)
    print(f"export: wrote {args.output} (crop settings {crop})")
    return 0


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", default="out/demo", help="folder for the demo's photos and results")


@command("demo", add_demo_arguments)
def run_demo_command(args: argparse.Namespace) -> int:
    from agepipe.demo import run_demo

    result = run_demo(args.output)
    print(f"\n{result['summary'].render('score')}\n\n{result['faces']}\n\nreport: {result['report']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="agepipe", description="Facial age estimation at scale on Ray.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name, (add_arguments, _) in COMMANDS.items():
        sub = subparsers.add_parser(name)
        sub.add_argument("--config", help="YAML file of settings (flags override it)")
        add_arguments(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    _, run = COMMANDS[args.command]
    try:
        return run(args)
    except (ValueError, StorageError, FileNotFoundError, ClusterUnreachable) as exc:
        print(f"agepipe {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
