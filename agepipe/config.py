"""Typed settings with their defaults: the one place where defaults live.

Every stage takes one of these dataclasses. Values come from the defaults here,
then an optional YAML file, then command-line flags. A field made with
`setting(help=...)` is also a command-line flag: `cli` has tyro build each command's
flags, their help and their shown defaults from these fields alone (a nested settings
dataclass's flags are the outer command's, without a prefix).
"""

from __future__ import annotations

import copy
import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, TypeVar

import tyro
import yaml

PROJECT_ROOT = Path(__file__).resolve().parent.parent
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
DEFAULT_AGE_BINS = (0, 13, 26, 43, 61)
DEFAULT_AGE_GROUPS = ("Child", "Youth", "Adult", "Middle Age", "Senior")


def setting(default: Any = dataclasses.MISSING, *, help: str, required: bool = False) -> Any:
    """A settings field that is also a command-line flag, with its help (tyro reads it from the field).
    A `required` one's default (empty) stands for "not given": the command line asks for it."""
    return field(default=default, metadata={"help": help, "required": required})


def weight_dirs() -> list[Path]:
    """Folders searched for a checkpoint's detector weights before they are downloaded: those in
    AGEPIPE_WEIGHTS_PATH (separated as PATH is; for machines without internet), then agepipe's cache."""
    listed = [Path(p) for p in os.environ.get("AGEPIPE_WEIGHTS_PATH", "").split(os.pathsep) if p]
    return [*listed, Path.home() / ".cache" / "agepipe"]


def shared_data_dir() -> Path:
    """The shared test/benchmark data folder; AGEPIPE_SHARED overrides `../shared`."""
    return Path(os.environ.get("AGEPIPE_SHARED", PROJECT_ROOT.parent / "shared"))


@dataclass
class AgeGroups:
    """Age-group bins: `lower_bounds[i]` is the first age of `names[i]`."""

    lower_bounds: tuple[int, ...] = DEFAULT_AGE_BINS
    names: tuple[str, ...] = DEFAULT_AGE_GROUPS

    def __post_init__(self) -> None:
        self.lower_bounds = tuple(int(b) for b in self.lower_bounds)
        self.names = tuple(str(n) for n in self.names)
        if len(self.lower_bounds) != len(self.names):
            raise ValueError("age groups need one name per lower bound")
        if list(self.lower_bounds) != sorted(set(self.lower_bounds)) or self.lower_bounds[0] != 0:
            raise ValueError("age-group lower bounds must start at 0 and increase")


@dataclass
class LabelSettings:
    """How labels are found: `kind` is utkface, imdb, none, or a CSV/Parquet table URI."""

    kind: Annotated[str, tyro.conf.arg(name="labels")] = setting(
        "none", help="labels: utkface, imdb, none, or a CSV/Parquet table URI"
    )
    max_age: float = setting(100.0, help="cap ages at this value")
    groups: tyro.conf.Suppress[AgeGroups] = field(default_factory=AgeGroups)  # YAML only


# Each detector's default confidence threshold, chosen from the precision/recall table over composite
# photos and face-free photos in the README (benchmarks/thresholds.py).
DETECTOR_MIN_SCORES = {"none": 0.0, "yunet": 0.8, "dlib": 0.6, "yolo": 0.5}


def detector_min_score(detector: str, min_score: float | None) -> float:
    """`min_score`, or the detector's default where it is None."""
    return DETECTOR_MIN_SCORES.get(detector, 0.5) if min_score is None else float(min_score)


@dataclass
class CropSettings:
    """Face detection and cropping; recorded in checkpoints so scoring crops like training.

    `geometry` places the face in its crop (`faces.CROP_GEOMETRIES`): `box`, the face box grown by
    `margin` into a square centred on it; `landmarks`, the five detector landmarks aligned to a
    template (eyes level), the box crop for detectors without landmarks; `clamped`, the square shrunk
    and moved to fit inside the image, which is how crops were made before this setting existed."""

    detector: str = setting("dlib", help="face detector")
    detector_weights: str | None = setting(None, help="detector weights: a path or URI")
    min_score: float | None = setting(None, help="detector confidence threshold; unset: the detector's own")
    all_faces: bool = setting(False, help="every face of an image, not only the largest")
    geometry: str = setting("landmarks", help="how a face is placed in its crop")
    margin: float = setting(0.0, help="margin around the face box, a fraction of its size")
    size: int = setting(224, help="crop side in pixels")
    encoding: str = setting("jpeg", help="crop encoding")
    jpeg_quality: int = setting(95, help="JPEG quality of the written crops")
    max_pixels: tyro.conf.Suppress[int] = 40_000_000  # larger images are refused as too_large before they are decoded


@dataclass
class CropJobSettings:
    """The crop job: input, output and how Ray runs it."""

    input: str = setting("", help="folder or s3:// prefix of images (recursive)", required=True)
    output: str = setting("", help="folder or s3:// prefix for the Parquet dataset", required=True)
    crop: CropSettings = field(default_factory=CropSettings)
    labels: LabelSettings = field(default_factory=LabelSettings)
    batch_size: int = setting(500, help="images per batch, written as one Parquet file")
    concurrency: int | None = setting(None, help="detector actors; unset: one per CPU")
    gpu_fraction: float = setting(0.25, help="of a GPU per detection actor, for detectors that run on one (yolo)")


T = TypeVar("T")

# Faces per forward pass where a caller does not set it (serve, evaluate's Grad-CAM, notebooks).
MODEL_BATCH_SIZE = 64

LEGACY_GEOMETRY = "clamped"


def recorded_crop_settings(values: dict[str, Any]) -> CropSettings:
    """Crop settings as recorded in a checkpoint or beside a crop dataset. Records older than the
    `geometry` setting were cropped clamped, and keep that."""
    return from_dict(CropSettings, {"geometry": LEGACY_GEOMETRY, **values})


def from_dict(cls: type[T], values: dict[str, Any]) -> T:
    """Build a settings dataclass from a (possibly nested) dict; a key that is none of its settings is an error."""
    known = {f.name: f for f in dataclasses.fields(cls)}
    strangers = set(values) - set(known)
    if strangers:
        raise ValueError(f"not settings of {cls.__name__}: {sorted(strangers)}")
    hints = {name: f.default_factory for name, f in known.items() if callable(f.default_factory)}
    kwargs = {}
    for name, value in values.items():
        factory = hints.get(name)
        if isinstance(value, dict) and dataclasses.is_dataclass(factory):
            kwargs[name] = from_dict(factory, value)
        else:
            kwargs[name] = tuple(value) if isinstance(value, list) else value
    return cls(**kwargs)


def to_dict(settings: Any) -> dict[str, Any]:
    """Plain dict of a settings dataclass (tuples become lists, for YAML and JSON)."""
    return yaml.safe_load(yaml.safe_dump(_plain(dataclasses.asdict(settings))))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def load(cls: type[T], yaml_path: str | None = None) -> T:
    """The defaults, with a YAML file's settings over them."""
    values: dict[str, Any] = {}
    if yaml_path:
        with open(yaml_path) as f:
            values = yaml.safe_load(f) or {}
    return from_dict(cls, values)


# The bundled models' names are agepipe.model.BUNDLED_MODELS.
MODEL_HELP = (
    "checkpoint path or URI, or a bundled model: fast (one network, the default) or ensemble (three, half the speed)"
)

INTERVAL_LEVEL_HELP = "level of each age's interval (0.9: 90 percent); unset: the level the model's calibration records"


@dataclass
class ScoringCrop:
    """How score, serve and evaluate's Grad-CAM crop faces: as the model's checkpoint records its training
    crops (so scoring crops as training did), except every face of an image (training kept the largest,
    whose label it is) and the settings given here; an unset one is the model's."""

    all_faces: bool = setting(True, help="every face of an image, not only the largest")
    detector: str | None = setting(None, help="face detector; unset: the model's")
    detector_weights: str | None = setting(None, help="detector weights: a path or URI; unset: the model's")
    min_score: float | None = setting(None, help="detector confidence threshold; unset: the model's")
    geometry: str | None = setting(None, help="how a face is placed in its crop; unset: the model's")
    margin: float | None = setting(None, help="margin around the face box, a fraction of its size; unset: the model's")
    size: int | None = setting(None, help="crop side in pixels; unset: the model's")

    def given(self) -> dict[str, Any]:
        """The crop settings that replace the model's: `all_faces` and those set."""
        return {name: value for name, value in dataclasses.asdict(self).items() if value is not None}


@dataclass
class ModelAndCrop:
    """The model a command scores faces with, and how it crops them (evaluate's Grad-CAM)."""

    model: str | None = setting(None, help=MODEL_HELP)
    crop_overrides: ScoringCrop = field(default_factory=ScoringCrop)

    def __post_init__(self) -> None:
        if isinstance(self.crop_overrides, dict):  # from Python, as it was before it was a dataclass
            self.crop_overrides = ScoringCrop(**self.crop_overrides)


@dataclass
class ScoringModel(ModelAndCrop):
    """The model, its crop and how its network runs: stated once for score and serve."""

    # Off: the mirrored pass doubles the model's time per face for a small gain (the model card has it).
    flip_tta: bool = setting(False, help="also run each face mirrored and average the two (twice the model time)")
    runtime: str | None = setting(
        None,
        help="int8, onnx (float) or torch; unset: on a CPU int8 where the model has an int8 graph, else onnx; "
        "torch on a GPU",
    )
    interval_level: float | None = setting(None, help=INTERVAL_LEVEL_HELP)


@dataclass
class ScoreSettings(ScoringModel):
    """Batch scoring: images in, one prediction row per face out."""

    input: str = setting("", help="folder or s3:// prefix of images (recursive)", required=True)
    output: str = setting("", help="folder or s3:// prefix for the predictions Parquet", required=True)
    labels: LabelSettings = field(default_factory=LabelSettings)
    batch_size: int = setting(
        256, help="images per actor call, per forward pass (onnxruntime: 32 at a time) and per Parquet file"
    )
    concurrency: int | None = setting(None, help="scoring actors; unset: one per CPU")
    gpu_fraction: float = setting(0.25, help="of a GPU per scoring actor")


@dataclass
class TrainSettings:
    """Two-phase training on Ray Train: phase 1 trains the heads, phase 2 the top of the backbone. The
    defaults are the recipe of the shipped model (its card): no phase 1, every stage and its BatchNorm
    trained from the first step after a short warm-up."""

    data: str = setting("", help="the crop job's Parquet dataset (path or s3://)", required=True)
    output: str = setting("", help="run folder (path or s3://): checkpoints, metrics", required=True)
    backbone: str = setting("mobilenetv2_100", help="timm model name")
    pretrained: str | None = setting("default", help="backbone weights: default, hub, none, or a path/URI")
    initial_checkpoint: str | None = setting(
        None,
        help="fine-tune: start from this agepipe checkpoint's network (a path, a URI, or 'fast', the bundled "
        "single network) instead of --pretrained backbone weights; its backbone, heads and groups must match",
    )
    teacher: str | None = setting(
        None,
        help="distil: also train toward this agepipe checkpoint's predictions (one network or an ensemble, "
        "any backbone, the same age groups), scored once on every training face before the first epoch",
    )
    teacher_weight: float = setting(
        0.5, help="with --teacher: each head's loss is this share toward the teacher, the rest toward the labels"
    )
    age_head: str = setting("regression", help="age output")
    dense_units: int = setting(512, help="units of the shared dense layer")
    dropout: float = setting(0.3, help="dropout before the heads")
    image_size: int = setting(160, help="network input side in pixels")
    augmentation: str = setting("wild", help="training augmentation")
    batch_size: int = setting(64, help="faces per step on each worker")
    precision: str = setting(
        "fp32",
        help="the network's arithmetic in training (bf16: autocast, weights and losses in float32)",
    )
    phase1_epochs: int = setting(0, help="epochs training the heads on the frozen backbone")
    phase2_epochs: int = setting(10, help="epochs training the unfrozen stages too")
    phase1_lr: float = setting(3e-3, help="phase 1 learning rate")
    phase2_lr: float = setting(1e-3, help="phase 2 learning rate")
    weight_decay: float = setting(1e-4, help="AdamW weight decay")
    unfreeze_stages: int = setting(99, help="backbone stages trained in phase 2, from the top (more than it has: all)")
    freeze_batchnorm: bool = setting(False, help="phase 2 keeps the unfrozen stages' BatchNorm frozen")
    patience: int = setting(3, help="early-stopping patience in epochs")
    lr_schedule: str = setting("cosine", help="per-phase learning-rate schedule")
    warmup_epochs: float = setting(0.3, help="linear learning-rate ramp at the start of phase 2, in epochs")
    lr_factor: float = setting(0.3, help="plateau schedule: rate factor on a plateau")
    lr_patience: int = setting(1, help="plateau schedule: epochs without improvement before it cuts")
    age_loss_weight: float = setting(1.0, help="weight of the age loss")
    group_loss_weight: float = setting(1.0, help="weight of the age-group loss")
    gender_loss_weight: float = setting(1.0, help="weight of the gender loss")
    label_sigma: float = setting(2.0, help="distribution head: label smoothing in years")
    age_weighting: str = setting(
        "none",
        help="age loss per face by how rare its age is in training (sqrt_inverse; fourth_root_inverse is milder)",
    )
    max_per_age: int = setting(2000, help="training faces kept per year of age at most")
    min_per_age: int = setting(10, help="training faces per year of age at least (repeated)")
    val_fraction: float = setting(0.1, help="share of images held out for validation")
    test_fraction: float = setting(0.1, help="share of images held out for the test split")
    train_on_val: bool = setting(
        False,
        help="also train on the validation split, for a final fit of a recipe already fixed on held-out "
        "validation: validation metrics, early stopping and the best epoch then read trained faces",
    )
    seed: int = setting(42, help="seed of the split, balancing and shuffling")
    interval_level: float = setting(0.9, help="level of the age interval calibrated on the val faces after training")
    limit: int | None = setting(None, help="use at most this many faces (quick runs)")
    num_workers: int = setting(2, help="Ray Train workers (DDP)")
    use_gpu: bool = setting(False, help="one GPU per worker")
    cpus_per_worker: float | None = setting(
        None, help="CPUs each worker reserves; unset: the cluster's CPUs less one, shared"
    )
    max_failures: int = setting(2, help="restarts from the last checkpoint after a worker or node is lost")
    labels: LabelSettings = field(default_factory=LabelSettings)

    def __post_init__(self) -> None:
        if self.pretrained == "none":  # the word, as a flag or in YAML, for no backbone weights
            self.pretrained = None


@dataclass
class EvaluateSettings(ModelAndCrop):
    """The evaluation report: a predictions dataset (and its labels) in; plots, metrics.json and
    report.html out. Grad-CAM re-crops sampled faces from their source images with the model and crop
    settings that `score` recorded beside its predictions; `model` and `crop_overrides` override them."""

    predictions: str = setting("", help="the scoring job's Parquet dataset (or s3://)", required=True)
    output: str = setting("", help="folder or s3:// prefix for report, plots, metrics", required=True)
    labels: LabelSettings = field(default_factory=LabelSettings)
    run: str | None = setting(None, help="training run folder: adds its training curves (metrics.csv)")
    model: str | None = setting(None, help="checkpoint for Grad-CAM; unset: the one score recorded")
    gradcam_faces: int = setting(8, help="faces in the Grad-CAM grid (0: none)")
    gallery_photos: int = setting(12, help="scored photos in the gallery, widest age intervals first (0: none)")
    max_scatter_points: int = setting(20_000, help="points in the scatter plot at most")
    seed: int = setting(0, help="seed for the Grad-CAM and scatter samples")


@dataclass
class CalibrateSettings:
    """Calibrate a checkpoint's age intervals on labelled faces it did not train on (split conformal)."""

    model: str = setting("", help="checkpoint path or URI to calibrate", required=True)
    data: str = setting(
        "",
        help="crop dataset with labels (path or s3://): the val faces where the model records training on it, "
        "else every labelled face, taken as held out",
        required=True,
    )
    output: str | None = setting(None, help="where to write the calibrated checkpoint; unset: over --model")
    interval_level: float = setting(0.9, help="level of the interval recorded with the model (0.9: 90 percent)")
    int8: bool = setting(
        True,
        help="also record an int8 graph for CPU scoring (about twice the faces/s), kept only where it costs at most "
        "0.05 years on these faces; one network only",
    )


@dataclass
class CardSettings:
    """A model card for any checkpoint: its metrics on its held-out test split, aligned and in photos, its
    fairness tables, intervals, recipe and settings (`agepipe.card`)."""

    model: str | None = setting(None, help=MODEL_HELP)
    output: str = setting(
        "", help="folder for MODEL_CARD.md, the metrics file and the evaluation report", required=True
    )
    split: str | None = setting(
        None, help="the model's split file; unset: split.parquet beside the checkpoint, or the bundled models' split"
    )
    images: str | None = setting(None, help="folder of the split's UTKFace images; unset: the shared folder's")
    faces: int | None = setting(None, help="measure on a sample of this many test faces (a quick card); unset: all")
    wild_photos: int = setting(1100, help="photos of the in-the-wild evaluation (1100 place every bundled test face)")
    seed: int = setting(0, help="seed of the photos and of the face sample")
    recompute: bool = setting(False, help="measure even where metrics stored beside the checkpoint record it")


@dataclass
class ServeSettings(ScoringModel):
    """Online scoring over HTTP on Ray Serve: where it listens, input limits, batching, scaling."""

    host: str = setting("127.0.0.1", help="address to listen on; 127.0.0.1 is this machine only")
    port: int = setting(8000, help="HTTP port")
    # Ray Serve's throughput mode (gRPC from proxy to replica, user code on the replica's event loop, GC
    # frozen after start-up), applied to a Ray that agepipe starts; variables already set win. Direct
    # ingress stays off: without Ray's HAProxy ingress it only opens another port per replica.
    ray_serve_env: tyro.conf.Suppress[dict[str, str]] = field(
        default_factory=lambda: {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_DIRECT_INGRESS": "0"}
    )
    max_body_bytes: int = setting(10 * 1024 * 1024, help="largest accepted upload in bytes")
    batch_size: int = setting(16, help="most requests per batched forward pass")
    batch_wait_timeout_s: float = setting(0.02, help="longest wait for a batch to fill while the model is busy")
    min_replicas: int = setting(1, help="autoscaling lower bound")
    max_replicas: int = setting(2, help="autoscaling upper bound")
    target_ongoing_requests: float = setting(8.0, help="autoscaling target per replica")
    max_ongoing_requests: int = setting(64, help="requests a replica takes at once")
    num_cpus: float = setting(1.0, help="CPUs per replica")
    gpu_fraction: float = setting(0.25, help="of a GPU per replica, where there is one")


# What `agepipe tune` searches unless a YAML file's `search_space` replaces it (whole): each training
# setting with one sampler (`tune.SEARCH_SAMPLERS`) and its arguments.
DEFAULT_SEARCH_SPACE = {
    "phase1_lr": {"loguniform": [1e-3, 1e-2]},
    "phase2_lr": {"loguniform": [1e-4, 2e-3]},
    "dropout": {"uniform": [0.1, 0.5]},
    "dense_units": {"choice": [256, 512, 1024]},
    "unfreeze_stages": {"choice": [2, 4, 6, 9]},
    "group_loss_weight": {"uniform": [0.2, 1.0]},
    "gender_loss_weight": {"uniform": [0.2, 1.0]},
}


@dataclass
class TuneSettings:
    """Hyperparameter search over the training function; `train` holds the fixed settings and
    `search_space` (YAML only) the searched ones."""

    train: TrainSettings = field(default_factory=TrainSettings)
    search_space: tyro.conf.Suppress[dict[str, dict[str, Any]]] = field(
        default_factory=lambda: copy.deepcopy(DEFAULT_SEARCH_SPACE)
    )
    num_samples: int = setting(8, help="trials to run")
    max_concurrent_trials: int | None = setting(None, help="unset: as many as the CPUs allow")
    grace_period: int = setting(1, help="ASHA: epochs a trial runs before it can be stopped")
    reduction_factor: int = setting(3, help="ASHA: the share of trials kept at each rung is 1 over this")


@dataclass
class ExportSettings:
    """A checkpoint to share: fp16 weights, the crop settings, a calibration where one can be fitted."""

    model: tuple[str, ...] = setting(
        (),
        help="checkpoint to export (path or URI); several, trained on the same crops with one model config, "
        "are exported as one ensemble that scores with the mean of their ages and probabilities",
        required=True,
    )
    output: str = setting("", help="where to write the shareable checkpoint", required=True)
    full_precision: bool = setting(False, help="keep float32 weights (default fp16)")
    calibration_data: str | None = setting(
        None,
        help="crop dataset with labels to calibrate the age intervals on (`agepipe calibrate --data`); unset: the "
        "one the networks record training on, where it exists",
    )


@dataclass
class DemoSettings:
    """The demo: sample photos scored by the default model, and their report."""

    output: str = setting("out/demo", help="folder for the demo's photos and results")
