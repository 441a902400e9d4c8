"""Training: split and balancing logic, and real short runs on local Ray (DDP on CPU)."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import TINY_RUN, registered_checkpoints, run_cli

from agepipe.augment import decode_crop
from agepipe.calibrate import Calibration
from agepipe.config import DEFAULT_SEARCH_SPACE, AgeGroups, TrainSettings, TuneSettings
from agepipe.labels import GENDERS, group_index
from agepipe.model import BUNDLED_MODELS, DEFAULT_MODEL, AgeModel, load_checkpoint, normalize_uint8
from agepipe.predict import Predictor
from agepipe.train import check_initial_checkpoint, require_gpus, teacher_targets, with_absolute_paths
from agepipe.train_data import (
    age_loss_weights,
    balancing_weights,
    plan_dataset,
    split_dataset,
    stratified_split,
    usable_rows,
)
from agepipe.train_loop import (
    LR_SCHEDULES,
    model_config,
    multitask_loss,
    network_outputs,
    step_schedule,
    warmup_schedule,
)
from agepipe.tune import run_tune, search_space


def _frame(n: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"path": [f"img{i}.jpg" for i in range(n)], "age": rng.integers(0, 90, n).astype(float)})


def test_split_is_deterministic_stratified_and_by_image() -> None:
    frame = _frame(3000)
    extra = frame.iloc[:50].assign(age=frame["age"].iloc[:50])  # second faces of the same images
    frame = pd.concat([frame, extra], ignore_index=True)
    groups = AgeGroups()
    first = stratified_split(frame, groups, 0.1, 0.1, seed=3)
    assert first.equals(stratified_split(frame, groups, 0.1, 0.1, seed=3))
    assert not first.equals(stratified_split(frame, groups, 0.1, 0.1, seed=4))
    assert frame.assign(split=first).groupby("path")["split"].nunique().max() == 1
    shares = first.value_counts(normalize=True)
    assert abs(shares["train"] - 0.8) < 0.01 and abs(shares["test"] - 0.1) < 0.01
    by_group = pd.crosstab([group_index(a, groups) for a in frame["age"]], first, normalize="index")
    assert (by_group["test"] - 0.1).abs().max() < 0.02


def test_balancing_caps_common_ages_and_repeats_rare_ones() -> None:
    ages = pd.Series([30.0] * 50 + [90.0] * 3 + [40.0] * 12)
    copies = balancing_weights(ages, max_per_age=20, min_per_age=10, seed=0)
    assert copies[:50].sum() == 20 and set(copies[:50]) <= {0, 1}
    assert copies[50:53].sum() == 10 and copies[50:53].min() >= 1
    assert (copies[53:] == 1).all()


def test_inverse_density_age_weights_favour_rare_ages_keep_the_mean_loss_and_smooth_over_neighbours() -> None:
    # 100 faces a year at 20-40, 25 at 60-80, 50 at 5, and one face at 41 beside the crowded years.
    ages = np.concatenate([np.repeat(np.arange(20.0, 41), 100), np.repeat(np.arange(60.0, 81), 25), [5.0] * 50, [41.0]])
    uniform = age_loss_weights(ages, 100, "none")
    assert np.allclose(uniform, 1.0)
    weights = age_loss_weights(ages, 100, "sqrt_inverse")
    years = ages.round().astype(int)
    assert weights[years].mean() == pytest.approx(1.0)
    assert weights[70] > weights[30] and weights[5] > weights[30]
    assert weights[70] / weights[30] == pytest.approx(np.sqrt(100 / 25), rel=0.01)  # the square root
    milder = age_loss_weights(ages, 100, "fourth_root_inverse")
    assert milder[years].mean() == pytest.approx(1.0)
    assert milder[70] / milder[30] == pytest.approx((100 / 25) ** 0.25, rel=0.01)  # the fourth root
    # A lone face next to crowded years is not treated as rare: its neighbours share their density with it.
    assert weights[41] < 2 * weights[30]
    with pytest.raises(ValueError, match="unknown age weighting"):
        age_loss_weights(ages, 100, "inverse_cube")


def test_age_weights_scale_each_faces_age_loss_and_leave_the_other_heads_alone() -> None:
    torch.manual_seed(0)
    for head in ("regression", "distribution"):
        settings = TrainSettings(pretrained=None, image_size=64, dense_units=32, dropout=0.0, age_head=head)
        model = AgeModel(model_config(settings))
        model.eval()
        batch = {"image": torch.randn(4, 3, 64, 64), **_labelled_batch([3.0, 20.0, 35.0, 70.0])}
        outputs = network_outputs(model, batch["image"], "fp32")
        plain = multitask_loss(model, outputs, batch, settings)[0].item()
        ones = multitask_loss(model, outputs, {**batch, "age_weight": torch.ones(4)}, settings)[0].item()
        assert ones == pytest.approx(plain, rel=1e-6)
        only_age = dataclasses.replace(settings, group_loss_weight=0.0, gender_loss_weight=0.0)
        per_face = [multitask_loss(model, _one(outputs, i), _one(batch, i), only_age)[0].item() for i in range(4)]
        weights = torch.tensor([0.0, 0.0, 0.0, 4.0])
        weighted = multitask_loss(model, outputs, {**batch, "age_weight": weights}, only_age)[0].item()
        assert weighted == pytest.approx(per_face[3], rel=1e-5), head  # the mean over 4 faces, one weighing 4
        others = dataclasses.replace(settings, age_loss_weight=0.0)
        assert multitask_loss(model, outputs, {**batch, "age_weight": weights}, others)[0].item() == pytest.approx(
            multitask_loss(model, outputs, batch, others)[0].item(), rel=1e-6
        )


def _one(batch: dict[str, torch.Tensor], i: int) -> dict[str, torch.Tensor]:
    return {k: v[i : i + 1] for k, v in batch.items()}


def test_rows_with_errors_or_without_age_are_left_out_and_counted() -> None:
    frame = pd.DataFrame(
        {"path": list("abcd"), "age": [1.0, None, 3.0, None], "error": [None, None, "no_face", "corrupt"]}
    )
    kept, dropped = usable_rows(frame)
    assert list(kept["path"]) == ["a"] and dropped == {"error_or_no_face": 2, "no_age": 1}


def test_train_on_val_adds_the_val_faces_to_training_and_keeps_the_test_split(small_faces, ray_local) -> None:
    held_out = TrainSettings(data=str(small_faces), output="unused", min_per_age=0)
    final_fit = dataclasses.replace(held_out, train_on_val=True)
    plan, _ = plan_dataset(held_out)
    fit_plan, _ = plan_dataset(final_fit)
    assert plan["split"].equals(fit_plan["split"]), "the split must not depend on what is trained on"
    assert set(plan.loc[plan["trained"], "split"]) == {"train"} and (plan.loc[~plan["trained"], "copies"] == 0).all()
    assert set(fit_plan.loc[fit_plan["trained"], "split"]) == {"train", "val"}
    assert (fit_plan.loc[fit_plan["split"] == "test", "copies"] == 0).all()
    counts = {s: (plan["split"] == s).sum() for s in ("train", "val")}
    assert split_dataset(held_out, plan, "train", 0.25).count() == counts["train"]
    assert split_dataset(final_fit, fit_plan, "train", 0.25).count() == counts["train"] + counts["val"]
    assert split_dataset(final_fit, fit_plan, "val", 0.25).count() == counts["val"], "val is still scored, once each"


def test_a_search_that_trains_on_val_is_refused(tmp_path) -> None:
    settings = TuneSettings(train=TrainSettings(data="d", output=str(tmp_path / "o"), train_on_val=True))
    with pytest.raises(ValueError, match="leave out --train-on-val"):
        run_tune(settings)


def _rates(schedule: str, val_maes: list[float], settings: TrainSettings) -> list[float]:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = LR_SCHEDULES[schedule](optimizer, settings, len(val_maes))
    rates = []
    for val_mae in val_maes:
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        step_schedule(scheduler, val_mae)
    return rates


def test_normalize_uint8_is_todtype_and_normalize_in_one_pass() -> None:
    from torchvision.transforms import v2

    from agepipe.model import IMAGENET_MEAN, IMAGENET_STD

    reference = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    pixels = torch.randint(0, 256, (4, 16, 16, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    channels_last = pixels.permute(0, 3, 1, 2)  # how a stack of HWC crops arrives
    normalized = normalize_uint8(channels_last)
    assert normalized.dtype == torch.float32 and normalized.is_contiguous()
    torch.testing.assert_close(normalized, reference(channels_last), rtol=0, atol=1e-5)
    torch.testing.assert_close(normalize_uint8(channels_last[0]), reference(channels_last[0]), rtol=0, atol=1e-5)
    assert pixels.dtype == torch.uint8 and int(pixels.max()) > 200  # the input is left alone


@pytest.mark.parametrize(("precision", "dtype"), [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_training_precision_sets_the_networks_dtype_and_steps_still_lower_the_loss(precision, dtype) -> None:
    torch.manual_seed(0)
    settings = TrainSettings(pretrained=None, image_size=64, dense_units=32, dropout=0.0, precision=precision)
    model = AgeModel(model_config(settings))
    model.train()
    seen: list[torch.dtype] = []
    model.backbone.conv_stem.register_forward_hook(lambda _m, _i, output: seen.append(output.dtype))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ages = torch.tensor([3.0, 20.0, 35.0, 70.0] * 4)
    batch = {
        "image": torch.randn(16, 3, 64, 64),
        "age": ages,
        "group": torch.tensor([group_index(float(a), AgeGroups()) for a in ages]),
        "gender": torch.tensor([0, 1] * 8),
    }
    losses = []
    for _ in range(8):
        outputs = network_outputs(model, batch["image"], settings.precision)
        assert all(value.dtype == torch.float32 for value in outputs.values())
        loss, _ = multitask_loss(model, outputs, batch, settings)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert set(seen) == {dtype}
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert losses[-1] < 0.7 * losses[0], losses


def test_lr_schedules_by_name() -> None:
    settings = TrainSettings(lr_factor=0.5, lr_patience=1)
    cosine = _rates("cosine", [9.0] * 5, settings)
    assert cosine[0] == 1.0 and all(a > b for a, b in zip(cosine, cosine[1:], strict=False)) and cosine[-1] < 0.2
    # The plateau schedule halves the rate only after two epochs without a better val MAE.
    assert _rates("plateau", [9.0, 8.0, 8.5, 8.6, 7.0, 7.5], settings) == [1.0, 1.0, 1.0, 1.0, 0.5, 0.5]


def test_warmup_ramps_linearly_to_the_scheduled_rate() -> None:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    epochs = LR_SCHEDULES["cosine"](optimizer, TrainSettings(), 5)
    warmup = warmup_schedule(optimizer, 4)
    rates = []
    for _ in range(6):  # optimizer steps within the first epoch
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        warmup.step()
    assert rates == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 1.0])
    epochs.step()  # the epoch schedule goes on from the full rate
    assert optimizer.param_groups[0]["lr"] == pytest.approx(_rates("cosine", [9.0] * 5, TrainSettings())[1])
    assert warmup_schedule(optimizer, 0) is None  # no warm-up: the scheduled rate from the first step


def _wait_for_checkpoints(output: Path, count: int, process: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while len(registered_checkpoints(output / "ray_train")) < count:
        assert process.poll() is None, "training ended early"
        assert time.time() < deadline, f"fewer than {count} checkpoints in time"
        time.sleep(0.5)


def test_interrupted_ddp_run_resumes_from_its_last_checkpoint_learns_and_reloads(small_faces, tmp_path) -> None:
    # Two DDP workers on CPU, the whole run killed after its first checkpoint and run again (a killed
    # worker, a lost node, is tests/test_node_loss.py's). One phase-1 and one phase-2 epoch.
    output = tmp_path / "run"
    command = ("train", "--data", str(small_faces), "--output", str(output), *TINY_RUN,
               "--phase1-epochs", "1", "--phase2-epochs", "1", "--phase1-lr", "0.01", "--patience", "10")  # fmt: skip
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen(
            [sys.executable, "-m", "agepipe.cli", *command],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            _wait_for_checkpoints(output, 1, first)
        finally:
            os.killpg(first.pid, signal.SIGKILL)  # the driver and the Ray it started
            first.wait()
    assert not (output / "metrics.csv").exists(), "the first run should not have finished"
    # What the killed run left: its last registered checkpoint, the epoch it ended and the history so far.
    last = registered_checkpoints(output / "ray_train")[-1]
    saved = torch.load(output / "ray_train" / last / "state.pt", map_location="cpu", weights_only=True)
    assert saved["epoch"] == 0 and [row["epoch"] for row in saved["history"]] == [0]
    second = run_cli(*command)  # the same command again resumes from the storage path
    assert second.returncode == 0, second.stderr[-3000:]
    metrics = pd.read_csv(output / "metrics.csv")
    # Resumed at epoch 1: epoch 0's row is the killed run's own, its measured speed included (a run that
    # started over would train epoch 0 again and measure it anew).
    assert metrics.iloc[0].to_dict() == pytest.approx(saved["history"][0], rel=1e-9), "the resumed run started over"
    assert list(metrics["epoch"]) == [0, 1] and list(metrics["phase"]) == [1, 2], "epochs were lost or repeated"
    assert metrics["train_loss"].iloc[-1] < metrics["train_loss"].iloc[0]
    assert {"val_mae", "val_group_accuracy", "val_gender_accuracy", "lr", "val_loss"} <= set(metrics.columns)
    split = pd.read_parquet(output / "split.parquet")
    assert set(split["split"]) == {"train", "val", "test"}

    model, crop, checkpoint = load_checkpoint(str(output / "model.pt"))
    assert crop.detector == "none" and crop.size == 96
    assert checkpoint["val_mae"] == metrics["val_mae"].min()
    # Calibrated at the end of the run on its val faces, which it did not train on.
    calibration = Calibration.from_dict(checkpoint["calibration"])
    assert calibration.faces == (split["split"] == "val").sum() and "val faces" in calibration.source
    again, _, _ = load_checkpoint(str(output / "model.pt"))
    images = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(images)["age"], again(images)["age"])


def test_a_search_space_names_settings_and_known_samplers() -> None:
    space = search_space({"phase2_lr": {"loguniform": [1e-4, 1e-3]}, "dense_units": {"grid": [256, 512]}})
    assert 1e-4 <= space["phase2_lr"].sample() <= 1e-3 and space["dense_units"] == {"grid_search": [256, 512]}
    assert set(search_space(TuneSettings().search_space)) == set(DEFAULT_SEARCH_SPACE)
    with pytest.raises(ValueError, match="'learning_rate' is not a training setting"):
        search_space({"learning_rate": {"choice": [0.1]}})
    with pytest.raises(ValueError, match="unknown search_space sampler 'normal': use one of choice, grid, loguniform"):
        search_space({"dropout": {"normal": [0.2, 0.1]}})
    with pytest.raises(ValueError, match="with a list"):
        search_space({"dropout": {"uniform": 0.2}})


def test_fine_tuning_refuses_a_checkpoint_of_another_network_before_it_starts(tmp_path) -> None:
    # Fine-tuning that runs is tests/test_ray_jobs.py's: its training job starts from the bundled `fast` model.
    refused = run_cli("train", "--data", str(tmp_path / "faces"), "--output", str(tmp_path / "run"),
                      "--backbone", "efficientnet_lite0", "--initial-checkpoint", "fast")  # fmt: skip
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert "holds another network than these settings build: backbone 'mobilenetv2_100'" in refused.stderr
    # The bundled ensemble has no one network to start from, and the refusal names one that is.
    ensemble = TrainSettings(data=str(tmp_path / "faces"), output=str(tmp_path / "run"), initial_checkpoint="ensemble")
    with pytest.raises(
        ValueError, match=r"is an ensemble: start from one of its member checkpoints \(bundled: 'fast', the default\)"
    ):
        check_initial_checkpoint(with_absolute_paths(ensemble))
    assert not (tmp_path / "run").exists(), "a refused run should not have started"


def test_a_search_that_varies_the_shape_of_a_fine_tuned_network_is_refused_before_ray_starts(tmp_path) -> None:
    settings = TuneSettings(train=TrainSettings(data="d", output=str(tmp_path / "o"), initial_checkpoint="fast"))
    with pytest.raises(ValueError, match="the search space varies dense_units, which --initial-checkpoint fixes"):
        run_tune(settings)  # the default space searches dense_units
    assert not (tmp_path / "o").exists()


def test_fine_tuning_on_crops_of_another_view_warns(small_faces, tmp_path, caplog) -> None:
    settings = TrainSettings(
        data=str(small_faces), output=str(tmp_path / "run"), initial_checkpoint=str(BUNDLED_MODELS["fast"])
    )
    with caplog.at_level("WARNING", logger="agepipe.train"):
        check_initial_checkpoint(settings)
    # The bundled model was trained on YuNet's 224 px landmark crops; small_faces are whole images at 96 px.
    assert "detector 'yunet' (the data: 'none')" in caplog.text and "size 224 (the data: 96)" in caplog.text


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_use_gpu_without_gpus_exits_with_a_message_instead_of_waiting(ray_local, tmp_path) -> None:
    on_session_ray = {"RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}  # no Ray start of its own
    command = ("train", "--data", str(tmp_path / "faces"), "--output", str(tmp_path / "run"), "--use-gpu")
    result = run_cli(*command, env=on_session_ray)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "--use-gpu needs one GPU per worker (2) but the Ray cluster has 0: leave out --use-gpu" in result.stderr
    assert require_gpus(TrainSettings(use_gpu=True, num_workers=2), cluster_gpus=2) is None
    with pytest.raises(ValueError, match="--num-workers 1"):
        require_gpus(TrainSettings(use_gpu=True, num_workers=2), cluster_gpus=1)


def _labelled_batch(ages: list[float]) -> dict[str, torch.Tensor]:
    age = torch.tensor(ages)
    return {
        "age": age,
        "group": torch.tensor([group_index(float(a), AgeGroups()) for a in ages]),
        "gender": torch.tensor([0, 1, -1, 0][: len(ages)]),
    }


def _teacher_rows(ages: list[float], groups: list[int], genders: list[int]) -> torch.Tensor:
    group_probs = torch.nn.functional.one_hot(torch.tensor(groups), len(AgeGroups().names)).float()
    gender_probs = torch.nn.functional.one_hot(torch.tensor(genders), 2).float()
    return torch.cat([torch.tensor(ages)[:, None], group_probs, gender_probs], -1)


def test_a_distilled_loss_is_the_label_loss_at_weight_0_or_when_the_teacher_agrees_and_learns_the_teacher() -> None:
    torch.manual_seed(0)
    settings = TrainSettings(pretrained=None, image_size=64, dense_units=32, dropout=0.0)
    model = AgeModel(model_config(settings))
    model.eval()
    ages = [3.0, 20.0, 35.0, 70.0]
    batch = {"image": torch.randn(4, 3, 64, 64), **_labelled_batch(ages), "gender": torch.tensor([0, 1, 1, 0])}
    outputs = network_outputs(model, batch["image"], "fp32")
    label_loss = multitask_loss(model, outputs, batch, settings)[0].item()
    disagreeing = _teacher_rows([50.0] * 4, [3] * 4, [1] * 4)
    unweighted = dataclasses.replace(settings, teacher_weight=0.0)
    assert multitask_loss(model, outputs, {**batch, "teacher": disagreeing}, unweighted)[0].item() == pytest.approx(
        label_loss, rel=1e-5
    )
    agreeing = _teacher_rows(ages, batch["group"].tolist(), batch["gender"].tolist())
    assert multitask_loss(model, outputs, {**batch, "teacher": agreeing}, settings)[0].item() == pytest.approx(
        label_loss, rel=1e-5
    )
    assert multitask_loss(model, outputs, {**batch, "teacher": disagreeing}, settings)[0].item() > label_loss + 0.1

    # Trained toward the teacher alone, the network's predictions go where the teacher's are.
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    teacher_only = dataclasses.replace(settings, teacher_weight=1.0)
    for _ in range(60):
        outputs = network_outputs(model, batch["image"], "fp32")
        loss, _ = multitask_loss(model, outputs, {**batch, "teacher": disagreeing}, teacher_only)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():  # still in training mode: BatchNorm's statistics of this batch, as it was fitted
        outputs = network_outputs(model, batch["image"], "fp32")
    assert (outputs["age"].squeeze(-1) - 50.0).abs().max() < 5, outputs["age"]
    assert (outputs["group"].argmax(-1) == 3).all() and (outputs["gender"].argmax(-1) == 1).all()


def test_a_distilled_run_scores_each_training_face_with_its_teacher_and_trains_toward_it(
    small_faces, ray_local, tmp_path
) -> None:
    settings = TrainSettings(data=str(small_faces), output=str(tmp_path / "unused"), teacher=str(DEFAULT_MODEL))
    plan, _ = plan_dataset(settings)
    targets = teacher_targets(settings, plan)
    trained = plan[plan["trained"]]
    assert set(targets) == set(zip(trained["path"], trained["face_index"].fillna(-1).astype(int), strict=True))
    # Each face's row is the teacher's own prediction on that crop, as `agepipe score` gives it for a crop.
    predictor = Predictor(str(DEFAULT_MODEL))
    crops = pd.read_parquet(small_faces, columns=["path", "face_index", "image"]).set_index("path")
    for path, face_index in list(targets)[:5]:
        crop = decode_crop(crops.loc[path, "image"]).permute(1, 2, 0).numpy()
        expected = predictor.predict_crops([crop])[0]
        row = targets[(path, face_index)]
        assert row[0] == pytest.approx(expected["age"], abs=0.05)
        assert row[1:6] == pytest.approx(list(expected["age_group_probs"].values()), abs=1e-3)
        assert row[6 + GENDERS.index(expected["gender"])] == pytest.approx(expected["gender_prob"], abs=1e-3)
    rows = split_dataset(settings, plan, "train", 0.25, targets).take_all()
    assert len(rows) == trained["copies"].sum() and all(row["teacher"].shape == (8,) for row in rows)
    assert "teacher" not in split_dataset(settings, plan, "val", 0.25, targets).take(1)[0]

    # The whole command: a student of another backbone than its teacher trains on the teacher's targets.
    output = tmp_path / "run"
    result = run_cli("train", "--data", str(small_faces), "--output", str(output), *TINY_RUN,
                     "--phase2-epochs", "1", "--teacher", "fast", "--teacher-weight", "0.7")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "scoring the" in result.stderr and "training faces with the teacher" in result.stderr
    assert "teacher: 192 of 192 training faces scored" in result.stderr
    recorded = json.loads((output / "settings.json").read_text())
    assert recorded["teacher"] == str(BUNDLED_MODELS["fast"]) and recorded["teacher_weight"] == 0.7
    assert len(pd.read_csv(output / "metrics.csv")) == 1


def test_a_search_that_distils_is_refused(tmp_path) -> None:
    settings = TuneSettings(train=TrainSettings(data="d", output=str(tmp_path / "o"), teacher="default"))
    with pytest.raises(ValueError, match="tune does not distil: leave out --teacher"):
        run_tune(settings)
