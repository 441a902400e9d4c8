"""Calibrated age intervals: the split-conformal functions without Ray or a model, then a real checkpoint
calibrated on a real crop dataset, saved, loaded, exported to ONNX and scored."""

from __future__ import annotations

import pickle

import numpy as np
import onnx
import pandas as pd
import pytest
import torch
from helpers import run_cli

from agepipe.calibrate import (
    Calibration,
    calibrate_checkpoint,
    conformal_quantile,
    describe_int8,
    fit_calibration,
    held_out_faces,
)
from agepipe.metrics import interval_stats, interval_summary
from agepipe.model import (
    INT8_AGE_SHIFT,
    INT8_GRAPH,
    export_for_sharing,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from agepipe.predict import RUNTIMES, Predictor, prediction_columns, prediction_json
from agepipe.quantize import INT8_TOLERANCE, float_nodes, keeps_accuracy


def heteroscedastic_faces(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Predicted and actual ages whose error grows with age (sd 1 + age / 8) and pulls old faces younger: the
    shape of the shipped model's errors."""
    rng = np.random.default_rng(seed)
    actual = rng.uniform(1, 90, count)
    predicted = np.clip(actual - 0.05 * (actual - 35) + rng.normal(0, 1 + actual / 8), 0, 100)
    return predicted, actual


def coverage_of(calibration: Calibration, predicted: np.ndarray, actual: np.ndarray, level=None) -> float:
    low, high = calibration.bounds(predicted, 100, level)
    return interval_stats(actual, low, high)["coverage"]


def test_conformal_quantile_is_the_finite_sample_rank() -> None:
    scores = np.arange(1.0, 10.0)  # 9 scores: ceil(10 * 0.9) = 9th smallest
    assert conformal_quantile(scores, 0.9) == 9.0
    assert conformal_quantile(scores, 0.5) == 5.0
    assert conformal_quantile(scores, 0.95) == np.inf  # more than 9 scores can resolve
    with pytest.raises(ValueError, match="between 0 and 1"):
        conformal_quantile(scores, 90)


def test_the_adaptive_interval_covers_its_level_on_new_faces_and_is_narrow_for_the_young() -> None:
    calibration = fit_calibration(*heteroscedastic_faces(2000, seed=1), level=0.9)
    predicted, actual = heteroscedastic_faces(20_000, seed=2)
    assert 0.88 <= coverage_of(calibration, predicted, actual) <= 0.92
    assert 0.78 <= coverage_of(calibration, predicted, actual, level=0.8) <= 0.82
    young, old = actual < 15, actual > 65
    low, high = calibration.bounds(predicted, 100)
    width = high - low
    assert width[young].mean() * 2.5 < width[old].mean()  # a constant band would fail here
    for part in (young, old):
        assert interval_stats(actual[part], low[part], high[part])["coverage"] >= 0.85


def test_the_plain_interval_is_one_width_and_misses_the_old() -> None:
    plain = fit_calibration(*heteroscedastic_faces(2000, seed=1), adaptive=False)
    predicted, actual = heteroscedastic_faces(20_000, seed=2)
    low, high = plain.bounds(predicted, 100)
    inner = (predicted > 30) & (predicted < 70)  # away from the clipping at 0 and 100
    assert np.ptp((high - low)[inner]) < 1e-9
    old = actual > 65
    assert interval_stats(actual[old], low[old], high[old])["coverage"] < 0.85


def test_bounds_hold_the_age_and_stay_in_range() -> None:
    calibration = fit_calibration(*heteroscedastic_faces(500, seed=3))
    ages = np.array([0.0, 0.4, 3.0, 50.0, 99.5, 100.0])
    low, high = calibration.bounds(ages, 100)
    assert np.all((low >= 0) & (low <= ages) & (ages <= high) & (high <= 100))
    assert np.all(high - low > 0)
    # A level the scores cannot resolve gives every age rather than a false promise.
    tiny = fit_calibration(*heteroscedastic_faces(20, seed=4))
    low, high = tiny.bounds(ages, 100, level=0.99)
    assert np.all(low == 0) and np.all(high == 100)


def test_higher_levels_give_wider_intervals() -> None:
    calibration = fit_calibration(*heteroscedastic_faces(1000, seed=5))
    ages = np.linspace(0, 100, 21)
    widths = [np.subtract(*calibration.bounds(ages, 100, level)[::-1]) for level in (0.5, 0.8, 0.9, 0.95)]
    assert all(np.all(wider >= narrower) for narrower, wider in zip(widths, widths[1:], strict=False))
    assert widths[-1].mean() > widths[0].mean() * 1.5


def test_a_calibration_survives_its_plain_dict_and_refuses_too_few_faces() -> None:
    calibration = fit_calibration(*heteroscedastic_faces(300, seed=6), source="test faces")
    again = Calibration.from_dict(calibration.to_dict())
    assert again == calibration
    ages = np.linspace(0, 100, 11)
    np.testing.assert_array_equal(again.bounds(ages, 100)[1], calibration.bounds(ages, 100)[1])
    with pytest.raises(ValueError, match="at least 20"):
        fit_calibration(*heteroscedastic_faces(19, seed=6))


def test_interval_summary_by_group() -> None:
    frame = pd.DataFrame(
        {
            "age": [10.0, 28.0, 30.0, 45.0, 20.0],
            "label_age": [10, 20, 30, 40, 50],
            "age_low": [5, 25, 20, 35, None],  # the last face's model had no calibration
            "age_high": [15, 30, 40, 50, None],
            "label_gender": ["female", "female", "male", None, "male"],
            "label_age_group": ["Child", "Youth", "Adult", "Adult", "Adult"],
            "label_race": ["White"] * 5,
        }
    )
    summary = interval_summary(frame)
    assert summary["overall"] == {"faces": 4, "coverage": 0.75, "mean_width": 12.5}
    assert summary["by_gender"] == [
        {"group": "female", "faces": 2, "coverage": 0.5, "mean_width": 7.5},
        {"group": "male", "faces": 1, "coverage": 1.0, "mean_width": 20.0},
    ]
    assert [row["group"] for row in summary["by_age_group"]] == ["Child", "Youth", "Adult"]
    assert interval_summary(frame.assign(age_low=None, age_high=None)) is None


# --- a real checkpoint on a real crop dataset ---


@pytest.fixture(scope="module")
def calibrated(model_path, small_faces, tmp_path_factory) -> tuple[str, str]:
    """The test model without its calibration and int8 graph, and calibrated by `agepipe calibrate` on the small
    crop dataset (faces the model never trained on: it records training on another dataset)."""
    folder = tmp_path_factory.mktemp("calibrated")
    bare = str(folder / "bare.pt")
    checkpoint = read_checkpoint(model_path)
    for made_by_calibrate in ("calibration", INT8_GRAPH, "int8"):
        checkpoint.pop(made_by_calibrate, None)
    save_checkpoint(checkpoint, bare)
    output = str(folder / "calibrated.pt")
    result = run_cli("calibrate", "--model", bare, "--data", str(small_faces), "--output", output)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "calibrate:" in result.stdout and "240 faces" in result.stdout
    return bare, output


def test_agepipe_calibrate_records_a_calibration_that_loads_with_the_checkpoint(calibrated) -> None:
    bare, output = calibrated
    _, _, checkpoint = load_checkpoint(output)
    calibration = Calibration.from_dict(checkpoint["calibration"])
    assert calibration.level == 0.9 and calibration.faces == 240 and "every labelled face" in calibration.source
    assert torch.load(output, weights_only=True)["calibration"] == checkpoint["calibration"]
    assert "calibration" not in read_checkpoint(bare)


def test_a_model_without_calibration_scores_with_null_intervals_and_a_warning(calibrated, caplog) -> None:
    bare, _ = calibrated
    crop = np.full((96, 96, 3), 120, np.uint8)
    with caplog.at_level("WARNING"):
        row = Predictor(bare, {"detector": "none"}).predict_crops([crop])[0]
    assert row["age_low"] is None and row["age_high"] is None and row["age"] > 0
    assert [r for r in caplog.records if "has no calibration" in r.getMessage()]
    assert prediction_columns(row)["age_low"] is None and prediction_json(row)["age_high"] is None


def test_the_interval_survives_onnx_export_pickling_and_sharing(calibrated, small_faces, tmp_path) -> None:
    _, output = calibrated
    frame = pd.read_parquet(small_faces, columns=["image", "age"]).head(12)
    from agepipe.augment import decode_crop

    crops = [decode_crop(image).permute(1, 2, 0).numpy() for image in frame["image"]]
    torch_rows = Predictor(output, {"detector": "none"}, runtime="torch").predict_crops(crops)
    onnx_rows = pickle.loads(pickle.dumps(Predictor(output, {"detector": "none"}, runtime="onnx")))
    assert onnx_rows.model is None  # an actor's copy: the exported network alone, and the calibration
    shared = str(tmp_path / "shared.pt")
    export_for_sharing([output], shared)
    shared_float = Predictor(shared, {"detector": "none"}, runtime="onnx")
    for rows in (onnx_rows.predict_crops(crops), shared_float.predict_crops(crops)):
        for row, reference in zip(rows, torch_rows, strict=True):
            assert row["age_low"] == pytest.approx(reference["age_low"], abs=0.05)
            assert row["age_high"] == pytest.approx(reference["age_high"], abs=0.05)
    widths = [row["age_high"] - row["age_low"] for row in torch_rows]
    assert all(row["age_low"] <= row["age"] <= row["age_high"] for row in torch_rows)
    assert max(widths) - min(widths) > 1.0  # adaptive: not one band for every face


def test_calibrate_records_an_int8_graph_that_cpu_scoring_uses_within_its_tolerance(calibrated, small_faces) -> None:
    bare, output = calibrated
    checkpoint = read_checkpoint(output)
    record = checkpoint["int8"]
    assert record["faces"] == 240 and record["kept"] and record["int8_mae"] - record["float_mae"] <= INT8_TOLERANCE
    graph = onnx.load_from_string(checkpoint[INT8_GRAPH].numpy().tobytes())
    quantized = {node.input[0] for node in graph.graph.node if node.op_type == "DequantizeLinear"}
    convolutions = [node for node in graph.graph.node if node.op_type == "Conv"]
    pointwise = [node for node in convolutions if node.name not in float_nodes(graph)]
    assert pointwise and all(node.input[1] not in quantized for node in pointwise)  # weights come dequantized
    assert sum(node.op_type == "QuantizeLinear" for node in graph.graph.node) >= len(pointwise)
    frame = pd.read_parquet(small_faces, columns=["image"]).head(64)
    from agepipe.augment import decode_crop

    crops = [decode_crop(image).permute(1, 2, 0).numpy() for image in frame["image"]]
    default = pickle.loads(pickle.dumps(Predictor(output, {"detector": "none"}, device="cpu")))
    assert default.runtime_name == "int8" and default.model is None
    int8_ages = np.array([row["age"] for row in default.predict_crops(crops)])
    float_ages = np.array([row["age"] for row in Predictor(output, runtime="onnx").predict_crops(crops)])
    # Close to float face by face (a broken graph is years off on every face), and not the float graph itself.
    differences = np.abs(int8_ages - float_ages)
    assert 0 < differences.mean() < 1.0 and np.median(differences) < 1.0
    # The age shift travels with the actor's copy, moves each age by the recorded curve, and brings the int8
    # ages nearer the float graph's where it was fitted (these faces are among the 240).
    shift = record[INT8_AGE_SHIFT]
    assert default.runtime.age_shift == shift and np.all(np.diff(shift["knot_ages"]) > 0)
    assert "before its age shift" in describe_int8(record)
    images = default.transform(torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2))
    unshifted = RUNTIMES.create("int8", None, default.device, {INT8_GRAPH: checkpoint[INT8_GRAPH]})(images)["age"]
    shifted = default.runtime(images)["age"]
    moved = np.interp(unshifted.numpy(), shift["knot_ages"], shift["shifts"])
    assert np.abs(moved).max() > 0
    assert torch.allclose(shifted, unshifted + torch.from_numpy(moved).float(), atol=1e-5)

    def systematic(ages: np.ndarray) -> float:
        """The mean over age bins of |mean(int8 - float)|: int8's pull towards the middle."""
        bins = np.array_split(np.argsort(float_ages), 4)
        return float(np.mean([abs((ages[b] - float_ages[b]).mean()) for b in bins]))

    assert systematic(int8_ages) < systematic(np.clip(unshifted.numpy().ravel(), 0, 100))
    with pytest.raises(ValueError, match="no int8 graph: `agepipe calibrate"):
        Predictor(bare, runtime="int8")
    assert keeps_accuracy(5.0, 5.0 + INT8_TOLERANCE) and not keeps_accuracy(5.0, 5.0 + 2 * INT8_TOLERANCE)


def test_interval_level_changes_the_width(calibrated) -> None:
    _, output = calibrated
    crop = np.full((96, 96, 3), 120, np.uint8)
    widths = {}
    for level in (0.5, 0.9):
        row = Predictor(output, {"detector": "none"}, runtime="torch", interval_level=level).predict_crops([crop])[0]
        widths[level] = row["age_high"] - row["age_low"]
    assert 0 < widths[0.5] < widths[0.9]


def test_held_out_faces_of_a_dataset_the_model_trained_on_are_its_val_faces(calibrated, small_faces) -> None:
    _, output = calibrated
    checkpoint = read_checkpoint(output)
    settings = {"data": str(small_faces), "seed": 3, "val_fraction": 0.25, "test_fraction": 0.25}
    checkpoint["train_settings"] = settings
    faces, source = held_out_faces(checkpoint, str(small_faces))
    assert "val faces" in source and 40 <= len(faces) <= 80  # a quarter of 240, not the test or train faces
    with pytest.raises(ValueError, match="did not train on"):
        held_out_faces({**checkpoint, "train_settings": {**settings, "val_fraction": 0.02}}, str(small_faces))
    again = str(small_faces.parent / "again.pt")
    calibration = calibrate_checkpoint(output, str(small_faces), again, level=0.8, int8=False)
    assert INT8_GRAPH not in read_checkpoint(again)  # the int8 graph of other weights is not kept
    assert calibration.level == 0.8


def test_agepipe_export_calibrates_an_ensemble(calibrated, small_faces, tmp_path) -> None:
    _, output = calibrated
    ensemble = tmp_path / "ensemble.pt"
    args = ("export", "--model", output, output, "--output", str(ensemble))
    result = run_cli(*args, "--calibration-data", str(small_faces))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "export: 90% interval from 240 faces" in result.stdout
    checkpoint = read_checkpoint(str(ensemble))
    assert Calibration.from_dict(checkpoint["calibration"]).faces == 240
    # A network's own calibration and int8 graph are not the ensemble's, and an ensemble's graph stays float.
    assert all("calibration" not in member and "int8" not in member for member in checkpoint["members"])
    assert INT8_GRAPH not in checkpoint
    # Without data to calibrate on, the ensemble is written without one, and the command says so.
    bare = run_cli(*args)
    assert bare.returncode == 0 and "no calibration" in bare.stdout and "has no calibration" in bare.stderr
    assert "calibration" not in read_checkpoint(str(ensemble))
