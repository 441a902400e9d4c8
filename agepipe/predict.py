"""The one Predictor: crop + model + post-processing, shared by batch scoring and serving.

It loads a checkpoint (the committed default model when none is given) with
`weights_only=True`, crops faces with the crop job's function and the crop
settings recorded in the checkpoint (overridable), runs the model in batches
on the GPU when there is one, optionally averages with the horizontally
flipped face, and returns age, its calibrated interval (the checkpoint's `calibration`), the
distribution head's spread where there is one, age group and gender.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from agepipe import storage
from agepipe.calibrate import Calibration, check_level
from agepipe.config import (
    MODEL_BATCH_SIZE,
    CropSettings,
    ModelAndCrop,
    ScoringModel,
    from_dict,
    recorded_crop_settings,
    weight_dirs,
)
from agepipe.detectors import DETECTOR_WEIGHT_URLS, Detector, create_detector
from agepipe.faces import arrow_fields, check_crop_names, crop_images
from agepipe.images import SourceImage
from agepipe.labels import GENDERS
from agepipe.model import (
    INT8_AGE_SHIFT,
    INT8_GRAPH,
    AgeNetwork,
    ModelConfig,
    age_estimate,
    mixture,
    model_input,
    model_location,
    network_from_checkpoint,
    read_checkpoint,
)
from agepipe.registry import Registry

logger = logging.getLogger(__name__)


def resolve_detector_weights(crop: CropSettings) -> CropSettings:
    """Make recorded detector weights usable here: the recorded path when it exists, else a file of
    that name in `config.weight_dirs()`, else the detector's public download URL."""
    weights = crop.detector_weights
    if not weights or crop.detector not in DETECTOR_WEIGHT_URLS:
        return crop
    if storage.is_remote(weights) or Path(weights).is_file():
        return crop
    name = Path(weights).name
    for candidate in (folder / name for folder in weight_dirs()):
        if candidate.is_file():
            crop.detector_weights = str(candidate)
            return crop
    crop.detector_weights = DETECTOR_WEIGHT_URLS[crop.detector]
    logger.info("detector weights %s not found here; using %s", weights, crop.detector_weights)
    return crop


class TorchRuntime:
    """The network in eager PyTorch, on its device (the GPU path, and the reference), channels-last."""

    def __init__(self, network: Callable[[], AgeNetwork], device: torch.device, checkpoint: dict[str, Any]) -> None:
        self.model = network().to(memory_format=torch.channels_last)

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.model(images.contiguous(memory_format=torch.channels_last))


class OnnxRuntime:
    """The same network exported to ONNX and run by onnxruntime on the CPU: several times the
    images/s of eager PyTorch there (benchmarks/score.py measures both).

    It pickles as the ONNX bytes alone: the scoring job exports once in the driver and each actor
    opens a session on them, without rebuilding the PyTorch model (timm and torchvision imports,
    the export: 2 s of each actor's start).

    A batch runs through the session `max_batch` faces at a time: onnxruntime's CPU arena grows to
    the largest batch it has run and keeps that memory, and beyond 32 faces a larger batch is no
    faster (docs/what-was-tried.md)."""

    max_batch = 32

    def __init__(self, network: Callable[[], AgeNetwork], device: torch.device, checkpoint: dict[str, Any]) -> None:
        self.onnx = float_graph(network())
        self._session: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {"onnx": self.onnx, "_session": None}

    @property
    def session(self) -> Any:
        """Opened on first use, with as many threads as torch has then (Ray sets it from the actor's CPUs)."""
        if self._session is None:
            import onnxruntime

            options = onnxruntime.SessionOptions()
            options.intra_op_num_threads = torch.get_num_threads()
            options.inter_op_num_threads = 1
            self._session = onnxruntime.InferenceSession(self.onnx, options, providers=["CPUExecutionProvider"])
        return self._session

    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        chunks = [
            self.session.run(None, {"image": chunk.contiguous().numpy()}) for chunk in images.split(self.max_batch)
        ]
        return {
            name: torch.from_numpy(np.concatenate([outputs[i] for outputs in chunks]))
            for i, name in enumerate(OUTPUT_NAMES)
        }


class Int8Runtime(OnnxRuntime):
    """The int8 graph that `agepipe calibrate` recorded in the checkpoint (agepipe/quantize.py), on
    onnxruntime: about twice the float graph's faces per CPU second.

    A regression head's age then moves by the graph's recorded age shift, where calibrate fitted one: int8
    pulls ages towards the middle (the old younger, the young older), and the shift maps them back onto the
    float network's."""

    def __init__(self, network: Callable[[], AgeNetwork], device: torch.device, checkpoint: dict[str, Any]) -> None:
        if INT8_GRAPH not in checkpoint:
            raise ValueError(
                "this checkpoint has no int8 graph: `agepipe calibrate --model MODEL --data FACES` makes one"
            )
        self.onnx = checkpoint[INT8_GRAPH].numpy().tobytes()
        self.age_shift: dict[str, list[float]] | None = (checkpoint.get("int8") or {}).get(INT8_AGE_SHIFT)
        self._session = None

    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), "age_shift": self.age_shift}

    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        outputs = super().__call__(images)
        if self.age_shift is not None:
            ages = outputs["age"]
            shift = np.interp(ages.numpy(), self.age_shift["knot_ages"], self.age_shift["shifts"])
            outputs["age"] = ages + torch.from_numpy(shift).to(ages.dtype)
        return outputs


def float_graph(model: AgeNetwork) -> bytes:
    """The network exported to ONNX (float32, any batch size)."""
    size = model.config.image_size
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter announces its deprecation
        torch.onnx.export(
            model,
            (torch.zeros(2, 3, size, size),),
            buffer,
            input_names=["image"],
            output_names=OUTPUT_NAMES,
            dynamic_axes={"image": {0: "batch"}},
            dynamo=False,
        )
    return buffer.getvalue()


OUTPUT_NAMES = ["age", "group", "gender"]
# Each runtime is made from a maker of the float network (built only for a runtime that runs it), its device
# and the checkpoint it came from.
Runtime = Callable[[torch.Tensor], dict[str, torch.Tensor]]
RUNTIMES: Registry[Callable[[Callable[[], AgeNetwork], torch.device, dict[str, Any]], Runtime]] = Registry(
    "runtime", {"torch": TorchRuntime, "onnx": OnnxRuntime, "int8": Int8Runtime}
)


def default_runtime(device: torch.device, checkpoint: dict[str, Any]) -> str:
    """PyTorch on a GPU; on the CPU onnxruntime, with the checkpoint's int8 graph where it has one."""
    if device.type == "cuda":
        return "torch"
    return "int8" if INT8_GRAPH in checkpoint else "onnx"


class Predictor:
    """Faces and their age, age group and gender, from images or already-cropped faces.

    Its PyTorch network (`model`) is built from the checkpoint when first asked for: the int8 runtime scores
    without it, and without importing timm. With onnxruntime it pickles without it (the exported network
    carries the weights), so a copy unpickled in a Ray actor scores but has no `model` for Grad-CAM.
    """

    def __init__(
        self,
        model_uri: str | None = None,
        crop_overrides: dict[str, Any] | None = None,
        device: str | None = None,
        flip_tta: bool = False,
        batch_size: int = MODEL_BATCH_SIZE,
        detector: Detector | None = None,
        runtime: str | None = None,
        interval_level: float | None = None,
    ) -> None:
        self.model_uri = model_location(model_uri)
        checkpoint = read_checkpoint(self.model_uri)
        given = {name: value for name, value in (crop_overrides or {}).items() if value is not None}
        self.crop = resolve_detector_weights(dataclasses.replace(recorded_crop_settings(checkpoint["crop"]), **given))
        check_crop_names(self.crop)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.config: ModelConfig = from_dict(ModelConfig, checkpoint["model_config"])
        self._checkpoint: dict[str, Any] | None = checkpoint
        self._model: AgeNetwork | None = None
        self.runtime_name = runtime or default_runtime(self.device, checkpoint)
        self.runtime = RUNTIMES.create(self.runtime_name, self._network, self.device, checkpoint)
        self.flip_tta = flip_tta
        self.batch_size = batch_size
        self.checkpoint_info = {k: checkpoint.get(k) for k in ("val_mae", "epoch")}
        recorded = checkpoint.get("calibration")
        self.calibration = Calibration.from_dict(recorded) if recorded else None
        if self.calibration is None:
            logger.warning(
                "%s has no calibration: age_low and age_high are null (agepipe calibrate --model %s --data FACES)",
                self.model_uri,
                self.model_uri,
            )
        # None: the level recorded with the calibration.
        self.interval_level = None if interval_level is None else check_level(interval_level)
        self._detector = detector

    @classmethod
    def from_settings(
        cls,
        settings: ModelAndCrop,
        recorded_crop: dict[str, Any] | None = None,
        **options: Any,
    ) -> Predictor:
        """The Predictor that a scoring command's settings describe: their model, cropped as the model records
        (or as `recorded_crop`, the crop a scoring run recorded) with their `ScoringCrop` over it (every face
        by default), and for score and serve (`ScoringModel`) their flip_tta, runtime and interval level.
        `options` are the caller's own: a device, a batch size."""
        own = {}
        if isinstance(settings, ScoringModel):
            own = {
                "flip_tta": settings.flip_tta,
                "runtime": settings.runtime,
                "interval_level": settings.interval_level,
            }
        crop = {**(recorded_crop or {}), **settings.crop_overrides.given()}
        return cls(settings.model, crop, **{**own, **options})

    def __getstate__(self) -> dict[str, Any]:
        state = {**self.__dict__, "_detector": None, "_checkpoint": None}  # detectors hold native handles
        if isinstance(self.runtime, OnnxRuntime):
            state["_model"] = None
        return state

    @property
    def model(self) -> AgeNetwork | None:
        """The PyTorch network (Grad-CAM, the torch runtime); None in a copy unpickled without it."""
        if self._model is None and self._checkpoint is not None:
            self._model = network_from_checkpoint(self._checkpoint).to(self.device)
            self._checkpoint = None  # the network holds its weights now
        return self._model

    def _network(self) -> AgeNetwork:
        model = self.model
        assert model is not None  # the runtimes are made where the checkpoint is still held
        return model

    @property
    def detector(self) -> Detector:
        """Created on first use, so a Predictor for pre-cropped faces needs no detector weights."""
        if self._detector is None:
            self._detector = create_detector(self.crop.detector, self.crop.detector_weights, self.crop.min_score)
        return self._detector

    @property
    def level(self) -> float | None:
        """The level of the age intervals given: the one asked for, else the calibration's; None without one."""
        if self.calibration is None:
            return None
        return self.calibration.level if self.interval_level is None else self.interval_level

    @property
    def group_names(self) -> tuple[str, ...]:
        return self.config.groups.names

    def transform(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 RGB crops (CHW or NCHW) -> the network's normalized input."""
        return model_input(images, self.config.image_size)

    def _batch_tensor(self, crops: Sequence[np.ndarray]) -> torch.Tensor:
        if len({crop.shape for crop in crops}) == 1:
            # Crops of one size (the crop function's): one transform over the batch, the same arithmetic
            # as face by face without its per-face overhead (a tenth of the scoring job's time per face).
            batch = self.transform(torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2))
        else:
            batch = torch.stack(
                [self.transform(torch.from_numpy(np.ascontiguousarray(c)).permute(2, 0, 1)) for c in crops]
            )
        return batch.to(self.device)

    @torch.inference_mode()
    def predict_tensor(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Model outputs as probabilities for a normalized batch, averaged with the flip when enabled."""
        if self.flip_tta:
            # One pass over the faces and their mirror images together.
            both = self.runtime(torch.cat([images, images.flip(-1)]))
            outputs = {name: value[: len(images)] for name, value in both.items()}
            flipped = {name: value[len(images) :] for name, value in both.items()}
            outputs = mixture([outputs, flipped], self.config)
        else:
            outputs = self.runtime(images)
        probabilities = {name: value.softmax(-1) for name, value in outputs.items() if name != "age"}
        age, age_std = age_estimate(outputs["age"], self.config)
        result = {"age": age, **probabilities}
        if age_std is not None:
            result["age_std"] = age_std
        return result

    def predict_crops(self, crops: Sequence[np.ndarray]) -> list[dict[str, Any]]:
        """Predictions for RGB uint8 face crops (any size; resized to the model's input)."""
        results: list[dict[str, Any]] = []
        for start in range(0, len(crops), self.batch_size):
            outputs = self.predict_tensor(self._batch_tensor(crops[start : start + self.batch_size]))
            outputs = {k: v.float().cpu().numpy() for k, v in outputs.items()}
            if self.calibration is not None:
                lows, highs = self.calibration.bounds(outputs["age"], self.config.max_age, self.interval_level)
            for i in range(len(outputs["age"])):
                group_probs = outputs["group"][i]
                gender_probs = outputs["gender"][i]
                gender_index = int(gender_probs.argmax())
                results.append(
                    {
                        "age": float(outputs["age"][i]),
                        "age_low": None if self.calibration is None else float(lows[i]),
                        "age_high": None if self.calibration is None else float(highs[i]),
                        "age_std": float(outputs["age_std"][i]) if "age_std" in outputs else None,
                        "age_group": self.group_names[int(group_probs.argmax())],
                        "age_group_probs": {n: float(p) for n, p in zip(self.group_names, group_probs, strict=True)},
                        "gender": GENDERS[gender_index],
                        "gender_prob": float(gender_probs[gender_index]),
                    }
                )
        return results

    def crop_images(self, payloads: Sequence[bytes | np.ndarray | SourceImage]) -> list[list[dict[str, Any]]]:
        """Per image, the crop function's rows (box, score, crop, error) with this model's crop settings, each
        crop cut from at least as many source pixels as the network's input has, where the image has them."""
        return crop_images(payloads, self.detector, self.crop, source_side=min(self.crop.size, self.config.image_size))


# A prediction's columns in a scoring job's output (`prediction_columns`).
PREDICTION_FIELDS = arrow_fields(
    "age:float32 age_low:float32 age_high:float32 age_std:float32 age_group:string age_group_prob:float32 "
    "gender:string gender_prob:float32"
)


def prediction_columns(prediction: dict[str, Any]) -> dict[str, Any]:
    """A `Predictor.predict_crops` result as the output row's prediction columns (`PREDICTION_FIELDS`)."""
    return {
        "age": prediction["age"],
        "age_low": prediction["age_low"],
        "age_high": prediction["age_high"],
        "age_std": prediction["age_std"],
        "age_group": prediction["age_group"],
        "age_group_prob": prediction["age_group_probs"][prediction["age_group"]],
        "gender": prediction["gender"],
        "gender_prob": prediction["gender_prob"],
    }


def prediction_json(prediction: dict[str, Any]) -> dict[str, Any]:
    """A `Predictor.predict_crops` result as the HTTP answer gives it, rounded."""
    return {
        "age": round(prediction["age"], 2),
        **{name: _rounded(prediction[name]) for name in ("age_low", "age_high", "age_std")},
        "age_group": prediction["age_group"],
        "age_group_probs": {k: round(v, 4) for k, v in prediction["age_group_probs"].items()},
        "gender": prediction["gender"],
        "gender_prob": round(prediction["gender_prob"], 4),
    }


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 2)
