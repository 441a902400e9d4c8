"""Calibrated age intervals: conformal prediction on held-out faces, adaptive to the predicted age.

A face's interval is `age + shift(age) ± q * scale(age)`, widened where needed to hold the age itself.
`shift` is the mean error of held-out faces predicted at about that age (the model pulls the old younger
and the young older, so a senior's interval reaches further up than down) and `scale` their mean absolute
error about it (a child's interval is narrow, a senior's wide); `q` is the conformal quantile of held-out
faces' errors about the shifted age divided by the scale. Each face's score comes from curves fitted on the
other faces (cross-fitted in FOLDS folds, so that every held-out face gives a score without scoring its own
curves), and the recorded curves are fitted on all of them. Cross-fitting holds the level less strictly in
theory than a split into halves, but varied less between seeds on the bundled models' val -> test faces
(benchmarks/results/intervals-default.md). Why the predicted age and not the ensemble members'
disagreement: the model card's interval section and that benchmark.

The pure functions here need no Ray and no model; `calibrate_checkpoint` scores a crop dataset's labelled
faces with the Predictor and records the calibration in a checkpoint, where `score` and `serve` find it.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from agepipe import storage
from agepipe.config import CalibrateSettings, TrainSettings, from_dict
from agepipe.model import INT8_AGE_SHIFT, INT8_GRAPH, model_location, read_checkpoint, save_checkpoint
from agepipe.train_data import plan_dataset, read_labels, usable_rows

if TYPE_CHECKING:
    import torch

    from agepipe.predict import Predictor

logger = logging.getLogger(__name__)

DEFAULT_LEVEL = 0.9
CURVE_BINS = 10  # predicted-age bins of the curves: about 200 faces each in a 2,000-face val split
MIN_SCALE = 0.5  # years: a bin of near-perfect predictions must not make every interval there a point
FOLDS = 5  # each face's score comes from curves fitted on the other four fifths
MIN_FACES = 20  # held-out faces at least: enough for a curve per fold and a quantile


@dataclass(frozen=True)
class Calibration:
    """What a checkpoint records (`to_dict`) to give every age an interval at `level` or another level."""

    level: float
    knot_ages: tuple[float, ...]  # predicted ages of the curves' knots, increasing; the curves are flat beyond
    shifts: tuple[float, ...]  # the interval's centre minus the predicted age, at each knot (years)
    scales: tuple[float, ...]  # the interval's half-width per unit of quantile, at each knot (years)
    scores: tuple[float, ...]  # each held-out face's |actual - centre| / scale by its fold's curves, sorted
    faces: int  # held-out faces it was fitted on
    source: str  # where they came from, for the record

    def quantile(self, level: float | None = None) -> float:
        """The conformal quantile for `level` (default the recorded one): infinite when the scores are too
        few for it, which makes the interval every age."""
        return conformal_quantile(np.asarray(self.scores), self.level if level is None else level)

    def bounds(self, ages: np.ndarray, max_age: float, level: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        """`age_low`, `age_high` for predicted `ages`: within [0, max_age], and holding the age."""
        ages = np.asarray(ages, float)
        quantile = self.quantile(level)
        if math.isinf(quantile):
            return np.zeros_like(ages), np.full_like(ages, max_age)
        centre = ages + np.interp(ages, self.knot_ages, self.shifts)
        half = quantile * np.interp(ages, self.knot_ages, self.scales)
        return np.clip(centre - half, 0, ages), np.clip(centre + half, ages, max_age)

    def to_dict(self) -> dict[str, Any]:
        """Plain types, so a checkpoint holding it still loads with `torch.load(weights_only=True)`."""
        return {
            "level": self.level,
            "knot_ages": list(self.knot_ages),
            "shifts": list(self.shifts),
            "scales": list(self.scales),
            "scores": list(self.scores),
            "faces": self.faces,
            "source": self.source,
        }

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Calibration:
        return cls(
            level=float(values["level"]),
            **{name: tuple(float(v) for v in values[name]) for name in ("knot_ages", "shifts", "scales", "scores")},
            faces=int(values["faces"]),
            source=str(values["source"]),
        )


def check_level(level: float) -> float:
    if not 0 < level < 1:
        raise ValueError(f"an interval level is a share between 0 and 1 (0.9 for 90%), not {level}")
    return float(level)


def conformal_quantile(scores: np.ndarray, level: float) -> float:
    """The ceil((n + 1) * level)-th smallest of n scores: split conformal's finite-sample quantile."""
    rank = math.ceil((len(scores) + 1) * check_level(level))
    return math.inf if rank > len(scores) else float(np.sort(scores)[rank - 1])


def fit_curves(predicted: np.ndarray, errors: np.ndarray, bins: int = CURVE_BINS) -> tuple[np.ndarray, ...]:
    """Knots of the shift and scale curves from faces' predicted ages and errors (actual - predicted): per bin
    of predicted age (equal counts), its median predicted age, its mean error, and its mean absolute error
    about that mean (at least MIN_SCALE)."""
    order = np.argsort(predicted, kind="stable")
    chunks = np.array_split(order, min(bins, len(order)))
    ages = np.array([np.median(predicted[chunk]) for chunk in chunks])
    shifts = np.array([errors[chunk].mean() for chunk in chunks])
    scales = np.array([max(MIN_SCALE, float(np.abs(errors[chunk] - errors[chunk].mean()).mean())) for chunk in chunks])
    # Bins that share a median age (many faces predicted alike) become one knot: np.interp needs increasing ages.
    knots = np.unique(ages)
    return knots, *(np.array([curve[ages == age].mean() for age in knots]) for curve in (shifts, scales))


def fit_calibration(
    predicted: Sequence[float],
    actual: Sequence[float],
    level: float = DEFAULT_LEVEL,
    adaptive: bool = True,
    source: str = "",
    seed: int = 0,
) -> Calibration:
    """A calibration from held-out faces' predicted and actual ages: the curves fitted on all of them, each
    face's score by curves fitted on the other folds (FOLDS of them, drawn with `seed`). `adaptive=False`
    gives the plain interval: the age ± one width for every face."""
    predicted, actual = np.asarray(predicted, float), np.asarray(actual, float)
    if len(predicted) != len(actual):
        raise ValueError(f"{len(predicted)} predicted ages but {len(actual)} actual ones")
    if len(predicted) < MIN_FACES:
        raise ValueError(f"calibration needs at least {MIN_FACES} held-out faces with an age, got {len(predicted)}")
    check_level(level)
    errors = actual - predicted

    def curves(faces: np.ndarray) -> tuple[np.ndarray, ...]:
        if not adaptive:
            return np.zeros(1), np.zeros(1), np.ones(1)
        return fit_curves(predicted[faces], errors[faces])

    order = np.random.default_rng(seed).permutation(len(predicted))
    scores = np.empty(len(predicted))
    for fold in np.array_split(order, FOLDS):
        knots, shifts, scales = curves(np.setdiff1d(order, fold))
        at = predicted[fold]
        scores[fold] = np.abs(errors[fold] - np.interp(at, knots, shifts)) / np.interp(at, knots, scales)
    knots, shifts, scales = curves(order)
    return Calibration(
        level=level,
        knot_ages=tuple(float(v) for v in knots),
        shifts=tuple(float(v) for v in shifts),
        scales=tuple(float(v) for v in scales),
        scores=tuple(float(v) for v in np.sort(scores)),
        faces=len(predicted),
        source=source,
    )


# --- calibrating a checkpoint on a crop dataset ---


TRAIN_SETTINGS = {field.name for field in dataclasses.fields(TrainSettings)}


def network_records(checkpoint: dict) -> list[dict]:
    """The per-network records of a checkpoint (an ensemble's members, else itself): their train settings."""
    return checkpoint.get("members") or [checkpoint]


def held_out_faces(checkpoint: dict, data: str) -> tuple[pd.DataFrame, str]:
    """The labelled faces (path, face_index, age) of the crop dataset `data` that no network of the checkpoint
    trained on, and how they were chosen. A network that records training on this dataset leaves its val
    faces (the split re-made from its recorded settings; never its test faces, kept for measuring); a
    dataset that no network records is taken as held out whole."""
    frame, _ = usable_rows(read_labels(data))
    frame = frame[["path", "face_index", "age"]]
    held = pd.Series(True, index=frame.index)
    trained_here = 0
    for record in network_records(checkpoint):
        recorded = record.get("train_settings")
        if not recorded or recorded.get("data") != storage.absolute(data):
            continue
        trained_here += 1
        # A setting an older agepipe recorded and this one no longer has does not change the split.
        known = {name: value for name, value in recorded.items() if name in TRAIN_SETTINGS}
        plan, _ = plan_dataset(from_dict(TrainSettings, {**known, "data": data}))
        val = plan.loc[(plan["split"] == "val") & ~plan["trained"]]
        keys = set(zip(val["path"], val["face_index"], strict=True))
        held &= pd.Series([key in keys for key in zip(frame["path"], frame["face_index"], strict=True)], frame.index)
    if trained_here:
        source = f"the val faces of {data} ({trained_here} network(s) trained on its train faces)"
    else:
        source = f"every labelled face of {data} (no network records training on it)"
    faces = frame[held].reset_index(drop=True)
    if len(faces) < MIN_FACES:
        raise ValueError(
            f"{data} has {len(faces)} labelled faces that the model did not train on ({source}); calibration needs "
            f"{MIN_FACES}: give a crop dataset of held-out faces with labels"
        )
    return faces, source


def crop_images_of(data: str) -> pd.Series:
    """The encoded crops of the crop dataset `data`, by (path, face_index): read once for every pass."""
    import pyarrow.parquet as pq

    fs, path = storage.resolve(data)
    table = pq.read_table(path, filesystem=fs, columns=["path", "face_index", "image"])
    return table.to_pandas().set_index(["path", "face_index"])["image"]


def face_crops(images: pd.Series, faces: pd.DataFrame, batch: int) -> Iterator[list[np.ndarray]]:
    """The RGB crops of `faces` from `images` (`crop_images_of`), `batch` at a time."""
    from agepipe.augment import decode_crop

    for start in range(0, len(faces), batch):
        chunk = faces.iloc[start : start + batch]
        keys = zip(chunk["path"], chunk["face_index"], strict=True)
        yield [decode_crop(images[key]).permute(1, 2, 0).numpy() for key in keys]


def predicted_ages(predictor: Predictor, images: pd.Series, faces: pd.DataFrame) -> np.ndarray:
    """The predictor's age for each of `faces`, from their crops in `images` (`crop_images_of`)."""
    batches = face_crops(images, faces, predictor.batch_size)
    return np.array([row["age"] for crops in batches for row in predictor.predict_crops(crops)])


def int8_graph(
    predictor: Predictor, images: pd.Series, faces: pd.DataFrame, float_ages: np.ndarray
) -> tuple[torch.Tensor, np.ndarray, dict[str, Any]]:
    """The int8 graph of the predictor's float onnx network (activation ranges from the first of `faces`), its
    ages for `faces`, and its record: for a regression head the age shift that maps its ages onto the float
    graph's (`float_ages`; fitted on the same faces, as it needs no labels), and its error on them beside the
    float graph's, with the shift and without."""
    import torch

    from agepipe.predict import RUNTIMES
    from agepipe.quantize import CALIBRATION_FACES, keeps_accuracy, quantized_graph

    crops = [crop for batch in face_crops(images, faces.iloc[:CALIBRATION_FACES], 64) for crop in batch]
    inputs = predictor.transform(torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2)).numpy()
    graph = torch.frombuffer(bytearray(quantized_graph(predictor.runtime.onnx, inputs)), dtype=torch.uint8)
    quantized = copy.copy(predictor)
    quantized.runtime = RUNTIMES.create("int8", None, predictor.device, {INT8_GRAPH: graph})
    ages = predicted_ages(quantized, images, faces)
    labels = faces["age"].to_numpy(float)
    record: dict[str, Any] = {"faces": len(faces), "unshifted_mae": float(np.abs(ages - labels).mean())}
    if predictor.config.age_head == "regression":
        knots, shifts, _ = fit_curves(ages, float_ages - ages)
        record[INT8_AGE_SHIFT] = {"knot_ages": knots.tolist(), "shifts": shifts.tolist()}
        shifted = {INT8_GRAPH: graph, "int8": record}
        quantized.runtime = RUNTIMES.create("int8", None, predictor.device, shifted)
        ages = predicted_ages(quantized, images, faces)
    float_mae, int8_mae = (float(np.abs(predicted - labels).mean()) for predicted in (float_ages, ages))
    record.update(float_mae=float_mae, int8_mae=int8_mae, kept=keeps_accuracy(float_mae, int8_mae))
    return graph, ages, record


def calibrate_checkpoint(
    model: str, data: str, output: str | None = None, level: float = DEFAULT_LEVEL, int8: bool = True
) -> Calibration:
    """Fit the model's interval on the held-out labelled faces of the crop dataset `data` (`held_out_faces`)
    and write the checkpoint with it to `output` (default: over `model`). With `int8` (one network only), the
    checkpoint also gets an int8 graph for CPU scoring where it costs at most INT8_TOLERANCE years on those
    faces, and the interval is fitted on that graph's ages, which scoring on a CPU then gives."""
    from agepipe.predict import Predictor

    uri = model_location(model)
    checkpoint = read_checkpoint(uri)
    checkpoint.pop(INT8_GRAPH, None)  # made again from these weights, or not at all
    faces, source = held_out_faces(checkpoint, data)
    logger.info("calibrating %s on %d faces: %s", uri, len(faces), source)
    predictor = Predictor(uri, device="cpu", runtime="onnx")
    images = crop_images_of(data)
    ages = predicted_ages(predictor, images, faces)
    if int8 and not checkpoint.get("members"):
        graph, int8_ages, checkpoint["int8"] = int8_graph(predictor, images, faces, ages)
        if checkpoint["int8"]["kept"]:
            checkpoint[INT8_GRAPH], ages = graph, int8_ages
    calibration = fit_calibration(ages, faces["age"].to_numpy(float), level, source=source)
    checkpoint["calibration"] = calibration.to_dict()
    save_checkpoint(checkpoint, output or uri)
    return calibration


def recorded_data(checkpoint: dict) -> str | None:
    """The crop dataset that every network of the checkpoint records training on, where it still exists."""
    datasets = {(record.get("train_settings") or {}).get("data") for record in network_records(checkpoint)}
    data = datasets.pop() if len(datasets) == 1 else None
    return data if data and storage.exists(data) else None


def describe(calibration: Calibration, ages: Sequence[float] = (5, 30, 70)) -> str:
    """One line: the level, the faces it was fitted on and the interval at a few ages."""
    low, high = calibration.bounds(np.asarray(ages, float), 100)
    examples = ", ".join(f"{age:g}: {lo:.0f}-{hi:.0f}" for age, lo, hi in zip(ages, low, high, strict=True))
    return f"{calibration.level:.0%} interval from {calibration.faces} faces, {calibration.source} ({examples})"


def run_calibrate(settings: CalibrateSettings) -> str:
    """`agepipe calibrate`: calibrate `settings.model` on `settings.data`; the line that reports it."""
    output = settings.output or model_location(settings.model)
    calibration = calibrate_checkpoint(settings.model, settings.data, output, settings.interval_level, settings.int8)
    int8 = read_checkpoint(output).get("int8") if settings.int8 else None
    return f"calibrate: {describe(calibration)}{describe_int8(int8)}; written to {output}"


def describe_int8(record: dict[str, Any] | None) -> str:
    """What became of the int8 graph, for the calibrate line: kept or not, and its error beside float's."""
    if record is None:
        return ""
    kept = "kept" if record["kept"] else "not kept (over the tolerance: scoring stays in float)"
    line = f"; int8 graph {kept}, MAE {record['int8_mae']:.3f} against float's {record['float_mae']:.3f}"
    return line + (f" ({record['unshifted_mae']:.3f} before its age shift)" if INT8_AGE_SHIFT in record else "")
