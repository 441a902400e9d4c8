"""Grad-CAM: which regions of a face drive the predicted age (used by evaluate and serve)."""

from __future__ import annotations

import cv2
import numpy as np
import torch
from torch import nn

from agepipe.model import AgeModel, age_estimate, backbone_stages


def grad_cam(model: AgeModel, image: torch.Tensor, layer: nn.Module | None = None) -> np.ndarray:
    """Heatmap in [0, 1] (H, W of `image`) for the predicted age of one normalized (1, 3, H, W) input.

    The target layer defaults to the backbone's last stage; gradients flow even where
    the model's parameters are frozen because the input's activations are hooked.
    """
    layer = layer or backbone_stages(model)[-1]
    captured: dict[str, torch.Tensor] = {}

    def keep(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
        output.retain_grad()
        captured["activation"] = output

    handle = layer.register_forward_hook(keep)
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            inputs = image.detach().clone().requires_grad_(True)
            age, _ = age_estimate(model(inputs)["age"], model.config)
            age.sum().backward()
    finally:
        handle.remove()
        model.train(was_training)
    activation = captured["activation"]
    weights = activation.grad.mean(dim=(2, 3), keepdim=True)
    cam = torch.relu((weights * activation).sum(1))[0].detach().cpu().numpy()
    cam = cv2.resize(cam, (image.shape[-1], image.shape[-2]), interpolation=cv2.INTER_LINEAR)
    peak = cam.max()
    return cam / peak if peak > 0 else cam


def overlay(crop: np.ndarray, heatmap: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """The heatmap drawn over an RGB uint8 crop (resized to the crop) as a JET colour map."""
    heat = cv2.resize(heatmap.astype(np.float32), (crop.shape[1], crop.shape[0]))
    colored = cv2.applyColorMap(np.uint8(np.clip(heat, 0, 1) * 255), cv2.COLORMAP_JET)[:, :, ::-1]
    return np.uint8(np.clip(crop * (1 - alpha) + colored * alpha, 0, 255))


def explain_crop(predictor, crop: np.ndarray) -> np.ndarray:
    """Grad-CAM overlay (RGB uint8, crop-sized) for one face crop, with a Predictor's model."""
    if predictor.model is None:
        raise ValueError("this Predictor came without its PyTorch model (an unpickled copy): build one to explain")
    tensor = predictor.transform(torch.from_numpy(np.ascontiguousarray(crop)).permute(2, 0, 1))[None]
    heatmap = grad_cam(predictor.model, tensor.to(predictor.device))
    return overlay(crop, heatmap)
