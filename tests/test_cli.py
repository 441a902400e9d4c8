"""The command line is generated from the settings dataclasses: one source for each flag, its help and
its default, the same order of defaults, YAML and flags in every command (no cluster)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from agepipe import config
from agepipe.cli import COMMANDS, main, parse

SETTINGS = {
    "crop": config.CropJobSettings,
    "score": config.ScoreSettings,
    "train": config.TrainSettings,
    "evaluate": config.EvaluateSettings,
    "tune": config.TuneSettings,
    "serve": config.ServeSettings,
    "calibrate": config.CalibrateSettings,
    "card": config.CardSettings,
}
REQUIRED = {
    "crop": ["--input", "i", "--output", "o"],
    "score": ["--input", "i", "--output", "o"],
    "train": ["--data", "d", "--output", "o"],
    "evaluate": ["--predictions", "p", "--output", "o"],
    "tune": ["--data", "d", "--output", "o"],
    "serve": [],
    "calibrate": ["--model", "m", "--data", "d"],
    "card": ["--output", "o"],
}


def _flagged(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if "help" in f.metadata]


def _parse(command: str, *flags: str, yaml_file: Path | None = None):
    argv = [command, *REQUIRED[command], *flags, *(["--config", str(yaml_file)] if yaml_file else [])]
    return parse(argv)[1].settings


def _help(command: str, capsys, monkeypatch) -> str:
    """The command's --help, its lines long enough not to wrap, joined by single spaces."""
    monkeypatch.setenv("COLUMNS", "400")
    with pytest.raises(SystemExit):
        parse([command, "--help"])
    return " ".join(capsys.readouterr().out.split())


def test_every_command_with_settings_is_covered() -> None:
    assert set(SETTINGS) | {"export", "demo"} == set(COMMANDS)


@pytest.mark.parametrize("command", sorted(SETTINGS))
def test_help_lists_every_setting_flag_with_its_default_from_the_dataclass(command: str, capsys, monkeypatch) -> None:
    text = _help(command, capsys, monkeypatch)
    cls = SETTINGS[command]
    fields = _flagged(cls)
    assert fields
    for field in fields:
        flag = "--" + field.name.replace("_", "-")
        assert flag in text, flag
        assert "(default" not in field.metadata["help"] and "default:" not in field.metadata["help"]
        if field.type == "int" and not field.metadata["required"]:
            assert f"(default: {field.default})" in text, field.name


@pytest.mark.parametrize("command", sorted(SETTINGS))
def test_no_flag_given_gives_the_dataclass_defaults(command: str) -> None:
    parsed = _parse(command)
    expected = SETTINGS[command]()
    for field in _flagged(SETTINGS[command]):
        if not field.metadata["required"]:
            assert getattr(parsed, field.name) == getattr(expected, field.name), field.name


def test_a_flag_may_set_none_and_negated_flags_set_false() -> None:
    assert _parse("train", "--pretrained", "none").pretrained is None
    assert _parse("train", "--pretrained", "hub").pretrained == "hub"
    assert _parse("train").freeze_batchnorm is config.TrainSettings().freeze_batchnorm
    assert _parse("train", "--no-freeze-batchnorm").freeze_batchnorm is False
    assert _parse("train", "--freeze-batchnorm").freeze_batchnorm is True
    assert _parse("score", "--no-flip-tta").flip_tta is False and _parse("score", "--flip-tta").flip_tta is True


def test_tune_config_reads_tune_settings(tmp_path: Path) -> None:
    settings_file = tmp_path / "tune.yaml"
    settings_file.write_text(yaml.safe_dump({"grace_period": 2, "reduction_factor": 4, "train": {"phase2_epochs": 3}}))
    tune = _parse("tune", "--num-samples", "5", "--phase2-epochs", "6", yaml_file=settings_file)
    assert (tune.grace_period, tune.reduction_factor, tune.num_samples) == (2, 4, 5)
    assert tune.train.phase2_epochs == 6 and tune.train.data == "d"  # the flag wins over the file


@pytest.mark.parametrize("command", ["score", "serve", "evaluate"])
def test_crop_flags_merge_with_the_files_crop_overrides_in_every_command(command: str, tmp_path: Path) -> None:
    settings_file = tmp_path / "settings.yaml"
    settings_file.write_text(yaml.safe_dump({"crop_overrides": {"margin": 0.1, "geometry": "box"}}))
    parsed = _parse(command, "--geometry", "landmarks", "--min-score", "0.7", yaml_file=settings_file)
    assert {k: getattr(parsed.crop_overrides, k) for k in ("margin", "geometry", "min_score")} == {
        "margin": 0.1,
        "geometry": "landmarks",
        "min_score": 0.7,
    }
    assert "detector" not in parsed.crop_overrides.given()  # unset flags leave the model's own setting


def test_crop_job_flags_set_its_crop_and_label_settings() -> None:
    crop = _parse("crop", "--detector", "yunet", "--encoding", "png", "--labels", "utkface", "--max-age", "90")
    assert (crop.crop.detector, crop.crop.encoding, crop.labels.kind, crop.labels.max_age) == (
        "yunet",
        "png",
        "utkface",
        90.0,
    )
    with pytest.raises(SystemExit):
        parse(["score", *REQUIRED["score"], "--encoding", "png"])  # score writes no crops


def test_a_settings_flag_is_its_name_and_parses_back_to_the_value() -> None:
    for name, value in [("freeze_batchnorm", True), ("freeze_batchnorm", False), ("use_gpu", True),
                        ("use_gpu", False), ("phase2_epochs", 3), ("backbone", "resnet18")]:  # fmt: skip
        flag = "--" + name.replace("_", "-")
        given = ([flag] if value else ["--no-" + flag[2:]]) if isinstance(value, bool) else [flag, str(value)]
        parsed = _parse("train", *given)
        assert getattr(parsed, name) == value, (name, value)


@pytest.mark.parametrize(
    ("flags", "all_faces"),
    [((), True), (("--no-all-faces",), False), (("--all-faces",), True)],
)
def test_score_takes_every_face_unless_told_and_its_help_says_so(
    model_path, flags, all_faces, capsys, monkeypatch
) -> None:
    from agepipe.predict import Predictor

    text = _help("score", capsys, monkeypatch)
    assert "every face of an image, not only the largest (default: True)" in text
    settings = _parse("score", "--model", model_path, "--detector", "none", *flags)
    assert Predictor.from_settings(settings).crop.all_faces is all_faces


def test_a_settings_file_that_is_missing_or_names_no_setting_is_refused_on_one_line(tmp_path, capsys) -> None:
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text(yaml.safe_dump({"crop_overrides": {"encoding": "png"}}))  # score writes no crops
    for settings_file in (tmp_path / "missing.yaml", wrong):
        with pytest.raises(SystemExit) as refused:
            _parse("score", yaml_file=settings_file)
        assert refused.value.code == 2
        assert capsys.readouterr().err.startswith("agepipe score: error: ")


@pytest.mark.parametrize(
    ("command", "old", "new"),
    [("train", "--train-batchnorm", "--no-freeze-batchnorm"), ("score", "--largest-face-only", "--no-all-faces")],
)
def test_a_flag_that_changed_is_refused_with_the_flag_that_does_the_same_now(command, old, new, capsys) -> None:
    with pytest.raises(SystemExit) as refused:
        _parse(command, old)
    assert refused.value.code == 2
    assert f"agepipe {command}: error: {old} is now {new}" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("command", "flags", "error"),
    [
        ("crop", ["--geometry", "square"], "unknown crop geometry 'square': use one of box, clamped, landmarks"),
        ("crop", ["--encoding", "gif"], "unknown encoding 'gif': use one of jpeg, png"),
        ("score", ["--geometry", "square"], "unknown crop geometry 'square': use one of box, clamped, landmarks"),
        ("train", ["--augmentation", "heavy"], "unknown augmentation 'heavy': use one of basic, photo, wild, wild_cut"),
    ],
)
def test_a_name_no_registry_holds_fails_before_any_work_naming_those_it_holds(
    command, flags, error, tmp_path, capsys
) -> None:
    output = tmp_path / "output"
    given = ["--data" if command == "train" else "--input", str(tmp_path), "--output", str(output)]
    assert main([command, *given, *flags]) == 2
    assert f"agepipe {command}: error: {error}" in capsys.readouterr().err
    assert not output.exists()
