"""Typed settings with their defaults: the one place where defaults live.

Every stage takes one of these dataclasses. Values come from the defaults here,
then an optional YAML file, then command-line flags (`apply_overrides`).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

PROJECT_ROOT = Path(__file__).resolve().parent.parent
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
DEFAULT_AGE_BINS = (0, 13, 26, 43, 61)
DEFAULT_AGE_GROUPS = ("Child", "Youth", "Adult", "Middle Age", "Senior")


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

    kind: str = "none"
    max_age: float = 100.0
    groups: AgeGroups = field(default_factory=AgeGroups)


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

    detector: str = "dlib"
    detector_weights: str | None = None
    min_score: float | None = None  # None: the detector's default (DETECTOR_MIN_SCORES)
    all_faces: bool = False
    geometry: str = "landmarks"
    margin: float = 0.0
    size: int = 224
    encoding: str = "jpeg"
    jpeg_quality: int = 95
    max_pixels: int = 40_000_000


@dataclass
class CropJobSettings:
    """The crop job: input, output and how Ray runs it."""

    input: str = ""
    output: str = ""
    crop: CropSettings = field(default_factory=CropSettings)
    labels: LabelSettings = field(default_factory=LabelSettings)
    batch_size: int = 500  # images per actor call, written as one Parquet file
    concurrency: int | None = None
    gpu_fraction: float = 0.25  # of a GPU per detection actor, for detectors that run on one (yolo)


T = TypeVar("T")

LEGACY_GEOMETRY = "clamped"


def recorded_crop_settings(values: dict[str, Any]) -> CropSettings:
    """Crop settings as recorded in a checkpoint or beside a crop dataset. Records older than the
    `geometry` setting were cropped clamped, and keep that."""
    return from_dict(CropSettings, {"geometry": LEGACY_GEOMETRY, **values})


def from_dict(cls: type[T], values: dict[str, Any]) -> T:
    """Build a settings dataclass from a (possibly nested) dict; unknown keys are an error."""
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(values) - set(known)
    if unknown:
        raise ValueError(f"unknown settings for {cls.__name__}: {sorted(unknown)}")
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


def load(cls: type[T], yaml_path: str | None = None, **overrides: Any) -> T:
    """Defaults, then a YAML file, then explicit overrides (None means 'not given')."""
    values: dict[str, Any] = {}
    if yaml_path:
        with open(yaml_path) as f:
            values = yaml.safe_load(f) or {}
    settings = from_dict(cls, values)
    return apply_overrides(settings, overrides)


def apply_overrides(settings: T, overrides: dict[str, Any]) -> T:
    """Set dotted keys (`crop.margin`) on a settings dataclass, skipping None values."""
    for dotted, value in overrides.items():
        if value is None:
            continue
        target: Any = settings
        *parents, leaf = dotted.split(".")
        for parent in parents:
            target = getattr(target, parent)
        if not hasattr(target, leaf):
            raise ValueError(f"unknown setting {dotted!r}")
        setattr(target, leaf, value)
    return settings


@dataclass
class ScoreSettings:
    """Batch scoring: images in, one prediction row per face out."""

    input: str = ""
    output: str = ""
    model: str | None = None
    crop_overrides: dict[str, Any] = field(default_factory=dict)
    largest_face_only: bool = False  # every face is scored unless this is set
    labels: LabelSettings = field(default_factory=LabelSettings)
    batch_size: int = 256  # images per actor call and per forward pass
    concurrency: int | None = None
    gpu_fraction: float = 0.25
    flip_tta: bool = False  # the mirrored pass doubles the model's time per face (benchmarks/score.py)
    runtime: str | None = None
    rows_per_file: int = 5000


@dataclass
class TrainSettings:
    """Two-phase training on Ray Train: phase 1 trains the heads, phase 2 the top of the backbone."""

    data: str = ""
    output: str = ""
    backbone: str = "efficientnet_lite0"
    pretrained: str | None = "default"
    age_head: str = "regression"
    dense_units: int = 512
    dropout: float = 0.3
    image_size: int = 128
    augmentation: str = "basic"  # augment.AUGMENTATIONS: basic, photo (+ blur, JPEG), wild (+ backgrounds)
    batch_size: int = 64
    phase1_epochs: int = 1
    phase2_epochs: int = 14
    phase1_lr: float = 3e-3
    phase2_lr: float = 5e-4
    weight_decay: float = 1e-4
    unfreeze_stages: int = 9  # all of efficientnet_lite0 (7 block stages, conv_head, bn2); more = all
    freeze_batchnorm: bool = True  # BatchNorm of unfrozen stages keeps its ImageNet weights and statistics
    patience: int = 3
    lr_schedule: str = "cosine"
    warmup_epochs: float = 0.5  # linear learning-rate ramp over the start of phase 2
    lr_factor: float = 0.3
    lr_patience: int = 1
    age_loss_weight: float = 1.0
    group_loss_weight: float = 1.0
    gender_loss_weight: float = 1.0
    label_sigma: float = 2.0
    max_per_age: int = 2000
    min_per_age: int = 10
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    seed: int = 42
    limit: int | None = None
    num_workers: int = 2  # DDP workers; benchmarks/results/train.md compares one and two on 2 CPUs
    use_gpu: bool = False
    cpus_per_worker: float | None = None
    max_failures: int = 2
    labels: LabelSettings = field(default_factory=LabelSettings)


@dataclass
class EvaluateSettings:
    """The evaluation report: a predictions dataset (and its labels) in; plots, metrics.json and
    report.html out. `model` and `crop_overrides` should match the scoring run: Grad-CAM re-crops
    sampled faces from their source images with them."""

    predictions: str = ""
    output: str = ""
    labels: LabelSettings = field(default_factory=LabelSettings)
    run: str | None = None
    model: str | None = None
    crop_overrides: dict[str, Any] = field(default_factory=dict)
    gradcam_faces: int = 8
    max_scatter_points: int = 20_000
    seed: int = 0


@dataclass
class ServeSettings:
    """Online scoring over HTTP on Ray Serve: where it listens, input limits, batching, scaling."""

    host: str = "127.0.0.1"
    port: int = 8000
    model: str | None = None
    crop_overrides: dict[str, Any] = field(default_factory=lambda: {"all_faces": True})
    # Off: the mirrored pass doubles the model's time per face for a small gain (the model card has it).
    flip_tta: bool = False
    runtime: str | None = None
    # Ray Serve's throughput mode (gRPC from proxy to replica, user code on the replica's event loop, GC
    # frozen after start-up), applied to a Ray that agepipe starts; variables already set win. Direct
    # ingress stays off: without Ray's HAProxy ingress it only opens another port per replica.
    ray_serve_env: dict[str, str] = field(
        default_factory=lambda: {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_DIRECT_INGRESS": "0"}
    )
    max_body_bytes: int = 10 * 1024 * 1024
    batch_size: int = 16
    batch_wait_timeout_s: float = 0.02
    min_replicas: int = 1
    max_replicas: int = 2
    target_ongoing_requests: float = 8.0
    max_ongoing_requests: int = 64
    num_cpus: float = 1.0
    gpu_fraction: float = 0.25


@dataclass
class TuneSettings:
    """Hyperparameter search over the training function; `train` holds the fixed settings."""

    train: TrainSettings = field(default_factory=TrainSettings)
    num_samples: int = 8
    max_concurrent_trials: int | None = None
    grace_period: int = 1
    reduction_factor: int = 3
