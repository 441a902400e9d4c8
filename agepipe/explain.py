"""Grad-CAM: which regions of a face drive the predicted age (used by evaluate and serve)."""

from __future__ import annotations

import cv2
import numpy as np
import torch
from torch import nn

from agepipe.model import AgeNetwork, age_estimate, backbone_stages, networks


def grad_cam(model: AgeNetwork, image: torch.Tensor, layer: nn.Module | None = None) -> np.ndarray:
    """Heatmap in [0, 1] (H, W of `image`) for the predicted age of one normalized (1, 3, H, W) input.

    The target layer defaults to the backbone's last stage (each member's, averaged, for an ensemble);
    gradients flow even where the model's parameters are frozen because the input's activations are hooked.
    """
    layers = [layer] if layer is not None else [backbone_stages(network)[-1] for network in networks(model)]
    captured: list[torch.Tensor] = []

    def keep(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
        output.retain_grad()
        captured.append(output)

    handles = [target.register_forward_hook(keep) for target in layers]
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            inputs = image.detach().clone().requires_grad_(True)
            age, _ = age_estimate(model(inputs)["age"], model.config)
            age.sum().backward()
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    size = (image.shape[-1], image.shape[-2])
    cams = [cv2.resize(_class_activation(activation), size, interpolation=cv2.INTER_LINEAR) for activation in captured]
    cam = np.mean(cams, axis=0)
    peak = cam.max()
    return cam / peak if peak > 0 else cam


def _class_activation(activation: torch.Tensor) -> np.ndarray:
    weights = activation.grad.mean(dim=(2, 3), keepdim=True)
    return torch.relu((weights * activation).sum(1))[0].detach().cpu().numpy()


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
