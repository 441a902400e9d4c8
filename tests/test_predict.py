"""The Predictor's model runtimes and flip test-time augmentation, on real photos (no cluster)."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import run_cli
from skimage import data

from agepipe.model import BUNDLED_MODELS, networks
from agepipe.predict import Predictor


@pytest.fixture(scope="module")
def crops() -> list[np.ndarray]:
    return [data.astronaut()[:256, 128:384], data.chelsea()[:, 100:400], data.coffee()[:, :400]]


@pytest.fixture(scope="module")
def predictors(model_path) -> dict[str, Predictor]:
    return {
        runtime: Predictor(model_path, {"detector": "none"}, runtime=runtime, flip_tta=False)
        for runtime in ("torch", "onnx")
    }


def test_onnx_runtime_predicts_what_pytorch_predicts(predictors, crops) -> None:
    torch_rows = predictors["torch"].predict_crops(crops)
    onnx_rows = predictors["onnx"].predict_crops(crops)
    for reference, row in zip(torch_rows, onnx_rows, strict=True):
        assert row["age"] == pytest.approx(reference["age"], abs=1e-3)
        assert (row["gender"], row["age_group"]) == (reference["gender"], reference["age_group"])
        assert row["gender_prob"] == pytest.approx(reference["gender_prob"], abs=1e-4)


def test_onnx_runtime_runs_a_large_batch_in_parts_with_the_same_outputs(predictors) -> None:
    runtime, size = predictors["onnx"].runtime, predictors["onnx"].config.image_size
    images = torch.rand(2 * runtime.max_batch + 3, 3, size, size)
    in_parts = runtime(images)
    runtime.max_batch, limit = len(images), runtime.max_batch
    try:
        whole = runtime(images)
    finally:
        runtime.max_batch = limit
    for name, value in whole.items():
        assert in_parts[name].shape == value.shape == (len(images), *value.shape[1:])
        torch.testing.assert_close(in_parts[name], value, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("runtime", ["torch", "onnx"])
def test_flip_tta_averages_the_face_and_its_mirror(model_path, crops, runtime) -> None:
    plain = Predictor(model_path, {"detector": "none"}, runtime=runtime, flip_tta=False)
    with_flip = Predictor(model_path, {"detector": "none"}, runtime=runtime, flip_tta=True)
    mirrored = [crop[:, ::-1] for crop in crops]
    for row, original, mirror in zip(
        with_flip.predict_crops(crops), plain.predict_crops(crops), plain.predict_crops(mirrored), strict=True
    ):
        for group, probability in row["age_group_probs"].items():
            expected = (original["age_group_probs"][group] + mirror["age_group_probs"][group]) / 2
            assert probability == pytest.approx(expected, abs=1e-4)
        if row["age_std"] is None:  # a regression head averages the two ages
            assert row["age"] == pytest.approx((original["age"] + mirror["age"]) / 2, abs=1e-3)


def test_the_bundled_models_are_chosen_by_name(crops) -> None:
    default, ensemble = Predictor(), Predictor("ensemble")
    assert default.model_uri == str(BUNDLED_MODELS["fast"]) and ensemble.model_uri == str(BUNDLED_MODELS["ensemble"])
    assert Predictor("default").model_uri == Predictor("fast").model_uri == default.model_uri
    fast = default
    members = networks(ensemble.model)
    assert len(members) == 3 and networks(fast.model) == [fast.model]
    # `fast` is the ensemble's first network, so its predictions are that member's.
    first = members[0].state_dict()
    assert all(torch.equal(first[name], tensor) for name, tensor in fast.model.state_dict().items())
    ages = [face["age"] for face in fast.predict_crops(crops)]
    assert ages != [face["age"] for face in ensemble.predict_crops(crops)]


def test_an_unknown_runtime_is_refused_by_name(model_path) -> None:
    with pytest.raises(ValueError, match="unknown runtime 'tensorrt'"):
        Predictor(model_path, {"detector": "none"}, runtime="tensorrt")


def test_same_size_crops_transformed_as_one_batch_predict_what_face_by_face_does(predictors, crops) -> None:
    faces = [np.ascontiguousarray(np.rot90(data.astronaut()[:224, 140:364], k)) for k in range(4)]
    stacked = predictors["onnx"].predict_crops(faces)  # one size: one transform over the batch
    face_by_face = predictors["onnx"].predict_crops(faces + crops[:1])[:4]  # mixed sizes: face by face
    for row, reference in zip(stacked, face_by_face, strict=True):
        assert row["age"] == pytest.approx(reference["age"], abs=1e-3)
        assert row["gender_prob"] == pytest.approx(reference["gender_prob"], abs=1e-4)


def test_a_pickled_onnx_predictor_scores_the_same_without_timm_or_torchvision(predictors, crops, tmp_path) -> None:
    """How the scoring job ships its Predictor to actors: the exported network, not the PyTorch model."""
    shipped = tmp_path / "predictor.pkl"
    shipped.write_bytes(pickle.dumps(predictors["onnx"]))
    crops_file = tmp_path / "crops.npz"
    np.savez(crops_file, *crops)
    script = f"""
import json, pickle, sys
import numpy as np
predictor = pickle.loads(open({str(shipped)!r}, "rb").read())
crops = list(np.load({str(crops_file)!r}).values())
rows = predictor.predict_crops(crops)
print(json.dumps({{"ages": [r["age"] for r in rows], "model": predictor.model is None,
    "heavy": sorted(m for m in ("timm", "torchvision") if m in sys.modules)}}))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    shipped_result = json.loads(result.stdout.strip().splitlines()[-1])
    assert shipped_result["heavy"] == [] and shipped_result["model"] is True
    expected = [row["age"] for row in predictors["onnx"].predict_crops(crops)]
    assert shipped_result["ages"] == pytest.approx(expected, abs=1e-4)


def test_recorded_detector_weights_are_found_in_the_weights_path_before_a_download(tmp_path, monkeypatch) -> None:
    from agepipe.config import CropSettings
    from agepipe.detectors import DETECTOR_WEIGHT_URLS
    from agepipe.predict import resolve_detector_weights

    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # an empty agepipe cache
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "face_detection_yunet.onnx").write_bytes(b"weights")
    monkeypatch.setenv("AGEPIPE_WEIGHTS_PATH", os.pathsep.join([str(tmp_path / "a"), str(tmp_path / "b")]))
    recorded = CropSettings(detector="yunet", detector_weights="/elsewhere/face_detection_yunet.onnx")
    assert resolve_detector_weights(recorded).detector_weights == str(tmp_path / "b" / "face_detection_yunet.onnx")
    monkeypatch.setenv("AGEPIPE_WEIGHTS_PATH", str(tmp_path / "a"))
    missing = CropSettings(detector="yunet", detector_weights="/elsewhere/face_detection_yunet.onnx")
    assert resolve_detector_weights(missing).detector_weights == DETECTOR_WEIGHT_URLS["yunet"]


def _member_checkpoint(path, age_head: str, age_shift: float, seed: int, crop: dict | None = None) -> str:
    """A small untrained network, its age output shifted so that its ages sit inside 0-100."""
    import torch

    from agepipe.config import CropSettings
    from agepipe.model import AgeModel, ModelConfig, checkpoint_dict, save_checkpoint

    torch.manual_seed(seed)
    config = ModelConfig("mobilenetv2_100", None, age_head, 100, 32, 0.0, 64)
    network = AgeModel(config, backbone_weights=False)
    with torch.no_grad():
        if age_head == "regression":
            network.age_head.bias.fill_(age_shift)
        else:
            network.age_head.bias.copy_(-((torch.arange(101.0) - age_shift) ** 2) / 50)
    save_checkpoint(
        checkpoint_dict(network, CropSettings(**(crop or {"detector": "none"})), {"val_mae": 9.0}), str(path)
    )
    return str(path)


@pytest.mark.parametrize("age_head", ["regression", "distribution"])
def test_an_exported_ensemble_scores_its_members_mean_age_and_mixed_probabilities(tmp_path, crops, age_head) -> None:
    members = [_member_checkpoint(tmp_path / f"m{i}.pt", age_head, shift, i) for i, shift in enumerate((30, 50))]
    ensemble = tmp_path / "ensemble.pt"
    result = run_cli("export", "--model", *members, "--output", str(ensemble), "--full-precision")
    assert result.returncode == 0 and "an ensemble of 2 models" in result.stdout, result.stderr[-2000:]
    rows = {
        runtime: Predictor(str(ensemble), runtime=runtime, flip_tta=False).predict_crops(crops)
        for runtime in ("torch", "onnx")
    }
    member_rows = [Predictor(m, runtime="torch", flip_tta=False).predict_crops(crops) for m in members]
    for index in range(len(crops)):
        first, second = member_rows[0][index], member_rows[1][index]
        assert abs(first["age"] - second["age"]) > 5  # the members disagree, so a mean is visible
        for runtime_rows in rows.values():
            row = runtime_rows[index]
            assert row["age"] == pytest.approx((first["age"] + second["age"]) / 2, abs=1e-3)
            for group, probability in row["age_group_probs"].items():
                expected = (first["age_group_probs"][group] + second["age_group_probs"][group]) / 2
                assert probability == pytest.approx(expected, abs=1e-4)


def test_an_ensemble_of_a_network_with_itself_explains_and_scores_as_the_network(tmp_path, crops) -> None:
    from agepipe.explain import explain_crop
    from agepipe.model import export_for_sharing

    member = _member_checkpoint(tmp_path / "m.pt", "regression", 40, 0)
    export_for_sharing([member, member], str(tmp_path / "twice.pt"), half=False)
    alone = Predictor(member, runtime="torch", flip_tta=False)
    twice = Predictor(str(tmp_path / "twice.pt"), runtime="torch", flip_tta=False)
    assert [r["age"] for r in twice.predict_crops(crops)] == pytest.approx(
        [r["age"] for r in alone.predict_crops(crops)]
    )
    np.testing.assert_allclose(explain_crop(twice, crops[0]), explain_crop(alone, crops[0]), atol=2)


def test_networks_trained_on_other_crops_do_not_make_an_ensemble(tmp_path) -> None:
    box = _member_checkpoint(tmp_path / "box.pt", "regression", 30, 0, {"detector": "yunet", "geometry": "box"})
    landmarks = _member_checkpoint(tmp_path / "lm.pt", "regression", 30, 1, {"detector": "yunet"})
    result = run_cli("export", "--model", box, landmarks, "--output", str(tmp_path / "e.pt"))
    assert result.returncode == 2
    assert "was trained on other crops than" in result.stderr and not (tmp_path / "e.pt").exists()
