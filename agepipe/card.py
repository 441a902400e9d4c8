"""`agepipe card`: the model card of any checkpoint, in the sections of "Model Cards for Model Reporting"
(Mitchell et al., 2019) as Hugging Face cards use them, rendered from `static/model_card.md.j2`.

The metrics come from the checkpoint's own held-out test split (its training run's `split.parquet`, or the
bundled models' split): the test faces scored aligned by the scoring job (largest face) and evaluated, and the
same faces pasted into photos (`agepipe.wild`). That takes minutes for a full split, so metrics stored beside the
checkpoint as `<file stem>_metrics.json` (the bundled models ship theirs) are reused where they record the
checkpoint's own networks, unless `recompute`; a fresh measurement is written there under the output folder.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import jinja2
import pandas as pd
import yaml

from agepipe.calibrate import network_records
from agepipe.config import CardSettings, EvaluateSettings, LabelSettings, ScoreSettings, TrainSettings
from agepipe.evaluate import run_evaluate
from agepipe.model import BUNDLED_MODELS, DEFAULT_MODEL, INT8_GRAPH, model_location, read_checkpoint
from agepipe.result_tables import markdown_table
from agepipe.shared_data import UTKFACE, linked_folder
from agepipe.wild import BUNDLED_SPLIT, evaluate_wild, held_out_faces, interval_rows, scored

CARD_TEMPLATE = Path(__file__).resolve().parent / "static" / "model_card.md.j2"
CARD_FILE = "MODEL_CARD.md"
WILD_COLUMNS = ("system", "faces", "recall", "false faces / photo", "MAE", "bias", "age-group acc", "gender acc")
AGE_HEADS = {
    "regression": "one regression output, the age in years clamped to 0-100",
    "distribution": "a label distribution over 0-100 whose expectation is the age",
}
# The training settings a card shows: what makes the recipe (paths, workers and fault handling do not).
RECIPE_SETTINGS = (
    "backbone", "pretrained", "initial_checkpoint", "teacher", "teacher_weight", "age_head", "image_size",
    "augmentation", "batch_size", "phase1_epochs", "phase2_epochs", "phase1_lr", "phase2_lr", "weight_decay",
    "lr_schedule", "warmup_epochs", "unfreeze_stages", "freeze_batchnorm", "patience", "dense_units", "dropout",
    "age_loss_weight", "group_loss_weight", "gender_loss_weight", "label_sigma", "age_weighting", "max_per_age",
    "min_per_age", "val_fraction", "test_fraction", "train_on_val", "seed", "limit",
)  # fmt: skip


def metrics_file_name(location: str) -> str:
    """Where a checkpoint's stored metrics are named: `fast.pt` -> `fast_metrics.json`."""
    return f"{Path(location).stem}_metrics.json"


def network_summary(checkpoint: dict) -> list[dict]:
    """Each network's best validation MAE and epoch: what identifies the checkpoint in its metrics file."""
    return [{"best_val_mae": n.get("val_mae"), "best_epoch": n.get("epoch")} for n in network_records(checkpoint)]


def int8_summary(checkpoint: dict) -> dict | None:
    """The record of the int8 graph that scoring on a CPU runs (its errors, its age shift), None where it
    runs float: calibrating the same networks again changes every metric."""
    return checkpoint.get("int8") if INT8_GRAPH in checkpoint else None


def records_checkpoint(metrics: dict, checkpoint: dict) -> bool:
    """Whether stored metrics are this checkpoint's: the same networks and int8 graph, and intervals where it
    is calibrated."""
    recorded = [(n.get("best_val_mae"), n.get("best_epoch")) for n in metrics.get("networks", [])]
    own = [(n["best_val_mae"], n["best_epoch"]) for n in network_summary(checkpoint)]
    calibrated = not checkpoint.get("calibration") or bool((metrics.get("intervals") or {}).get("photos"))
    return recorded == own and metrics.get("int8") == int8_summary(checkpoint) and calibrated


def stored_metrics(location: str, checkpoint: dict, folders: list[Path], wild_photos: int) -> tuple[dict, Path] | None:
    """The first `<stem>_metrics.json` in `folders` that records this checkpoint measured on every test face
    with `wild_photos` photos (a file that does not say is taken as such: the bundled models'), and its path."""
    for folder in folders:
        path = folder / metrics_file_name(location)
        if path.is_file():
            metrics = json.loads(path.read_text())
            whole = metrics.get("faces_sample") is None and metrics.get("wild_photos", wild_photos) == wild_photos
            if whole and records_checkpoint(metrics, checkpoint):
                return metrics, path
    return None


def split_file(location: str, given: str | None) -> Path:
    """The checkpoint's split: `given`, else the `split.parquet` of the training run folder it lies in, else
    the bundled models' for a bundled model."""
    if given:
        return Path(given)
    beside = Path(location).parent / "split.parquet"
    if beside.is_file():
        return beside
    if Path(location).parent == BUNDLED_SPLIT.parent:
        return BUNDLED_SPLIT
    raise ValueError(f"no split.parquet beside {location}: give --split (the training run's split.parquet)")


def measure(settings: CardSettings, location: str, checkpoint: dict, scratch: Path) -> dict[str, Any]:
    """The card's metrics, measured: the test split aligned (and the evaluation report under the output
    folder), and in photos; the same structure as the bundled models' metrics files."""
    split = split_file(location, settings.split)
    faces = held_out_faces(split, Path(settings.images) if settings.images else UTKFACE)
    if settings.faces:
        faces = faces.sample(min(settings.faces, len(faces)), random_state=settings.seed)
    test_images = linked_folder([Path(source) for source in faces["source"]], scratch / "test-split")
    aligned = scored(test_images, scratch / "test-scores", location, every_face=False)
    report = run_evaluate(
        EvaluateSettings(
            predictions=str(scratch / "test-scores"),
            output=str(Path(settings.output) / "report"),
            labels=LabelSettings(kind="utkface"),
            model=location,
        )
    )
    wild = evaluate_wild(scratch / "wild", faces, settings.wild_photos, settings.seed, location, aligned)
    return {
        "test": report["metrics"],
        "test_flip_tta": ScoreSettings().flip_tta,
        "test_coverage": report["coverage"],
        "wild": wild.rows,
        "intervals": wild.intervals,
        "networks": network_summary(checkpoint),
        "int8": int8_summary(checkpoint),
        "split": split.name,
        "wild_photos": settings.wild_photos,
        "faces_sample": settings.faces,
    }


def headline(metrics: dict) -> dict[str, str]:
    """A model's headline metrics as the card shows them, by name."""
    test, (photos, aligned) = metrics["test"], metrics["wild"][:2]
    worst_race = max(test["by_race"], key=lambda row: row["mae"])
    oldest = test["by_age_group"][-1]
    return {
        "aligned age MAE (years)": f"{test['age']['mae']:.2f}",
        "age bias (years)": f"{test['age']['bias']:+.2f}",
        "age-group accuracy": f"{test['age_group']['accuracy']:.1%}",
        "gender accuracy": f"{test['gender']['accuracy']:.1%}",
        "in-the-wild MAE (matched faces)": f"{photos['MAE']:.2f} ({photos['MAE'] - aligned['MAE']:+.2f} aligned)",
        "in-the-wild recall": f"{photos['recall']:.1%}",
        "worst race MAE / overall MAE": f"{worst_race['mae'] / test['age']['mae']:.2f} ({worst_race['group']})",
        f"MAE of the oldest group ({oldest['group']})": f"{oldest['mae']:.2f}",
    }


def group_table(rows: list[dict], name: str) -> str:
    """MAE and bias by one attribute (age group, gender, race)."""
    renamed = [{name: r["group"], "faces": r["faces"], "MAE": r["mae"], "bias": r["bias"]} for r in rows]
    return markdown_table(renamed, formats={"bias": "+.2f"})


def recipe_yaml(train_settings: dict) -> str:
    """A network's training settings that differ from today's `agepipe train` defaults, as a `--config` file."""
    defaults = {f.name: f.default for f in dataclasses.fields(TrainSettings)}
    changed = {
        name: train_settings[name]
        for name in RECIPE_SETTINGS
        if name in train_settings and train_settings[name] != defaults[name]
    }
    return yaml.safe_dump(changed, sort_keys=False) if changed else "{}  # the defaults\n"


def network_rows(checkpoint: dict) -> list[dict]:
    """One row per network: its source, epochs trained and best validation epoch."""
    return [
        {
            "network": index,
            "trained as": "/".join(Path(network.get("source", "this checkpoint")).parts[-2:]),
            "epochs": len(network.get("history", [])),
            "best epoch": network.get("epoch"),
            "best val MAE": network.get("val_mae"),
        }
        for index, network in enumerate(network_records(checkpoint), start=1)
    ]


def bundled_names() -> dict[str, list[str]]:
    """The bundled models' files, each with the names `--model` takes for it (the default is another's)."""
    names: dict[str, list[str]] = {}
    for name, path in BUNDLED_MODELS.items():
        names.setdefault(str(path), []).append(name)
    return names


def other_bundled(location: str) -> dict[str, dict]:
    """For a bundled model: the other bundled models' stored metrics, by their names."""
    files = bundled_names()
    others = {}
    for path, names in files.items():
        metrics_path = Path(path).with_name(metrics_file_name(path))
        if location in files and path != location and metrics_path.is_file():
            others[" / ".join(names)] = json.loads(metrics_path.read_text())
    return others


def render_card(location: str, checkpoint: dict, metrics: dict, split: Path, measured_by: str) -> str:
    """The card's Markdown for a checkpoint, its metrics and its split (`measured_by`: where the metrics come
    from)."""
    first = network_records(checkpoint)[0]
    train_settings = first.get("train_settings", {})
    bundled = bundled_names().get(location, [])
    others = other_bundled(location)
    this = headline(metrics)
    comparison = [
        {"metric": m, "this model": v, **{n: headline(o)[m] for n, o in others.items()}} for m, v in this.items()
    ]
    calibration = checkpoint.get("calibration")
    environment = jinja2.Environment(trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    return environment.from_string(CARD_TEMPLATE.read_text()).render(
        file=Path(location).name,
        bundled=bundled,
        default=location == str(DEFAULT_MODEL),
        size_mb=os.path.getsize(location) / 2**20 if Path(location).is_file() else None,
        int8=checkpoint.get("int8"),
        config=checkpoint["model_config"],
        age_head=AGE_HEADS[checkpoint["model_config"]["age_head"]],
        network_count=len(network_records(checkpoint)),
        crop=json.dumps(checkpoint["crop"], indent=2),
        train=train_settings,
        recipes=[recipe_yaml(n.get("train_settings", {})) for n in network_records(checkpoint)],
        networks=markdown_table(network_rows(checkpoint), float_format=".2f"),
        metrics=metrics,
        measured_by=measured_by,
        headline=markdown_table([{"metric": m, "value": v} for m, v in this.items()]),
        others=markdown_table(comparison) if others else None,
        worst_group=max(metrics["test"]["by_age_group"], key=lambda row: row["mae"]),
        worst_race=max(metrics["test"]["by_race"], key=lambda row: row["mae"]),
        by_age_group=group_table(metrics["test"]["by_age_group"], "age group"),
        by_gender=group_table(metrics["test"]["by_gender"], "gender"),
        by_race=group_table(metrics["test"]["by_race"], "race"),
        wild=markdown_table([{c: row.get(c, float("nan")) for c in WILD_COLUMNS} for row in metrics["wild"]]),
        calibration=calibration,
        intervals=markdown_table(interval_rows(metrics["intervals"]), float_format=".3f")
        if calibration and (metrics.get("intervals") or {}).get("photos")
        else None,
        split=split.name,
        split_counts=pd.read_parquet(split)["split"].value_counts().to_dict(),
    )


def write_card(settings: CardSettings) -> dict[str, str]:
    """Write `MODEL_CARD.md` (and, where measured, `<stem>_metrics.json` and the evaluation report) to
    `settings.output`; returns the files written, by kind ("card", "metrics")."""
    if not settings.output:
        raise ValueError("card needs --output")
    location = model_location(settings.model)
    checkpoint = read_checkpoint(location)
    output = Path(settings.output)
    output.mkdir(parents=True, exist_ok=True)
    found = (
        None
        if settings.recompute or settings.faces
        else stored_metrics(location, checkpoint, [output, Path(location).parent], settings.wild_photos)
    )
    written = {}
    if found:
        metrics, path = found
        measured_by = f"stored in `{path.name}` (`agepipe card --recompute` measures them again)"
    else:
        with tempfile.TemporaryDirectory() as scratch:
            metrics = measure(settings, location, checkpoint, Path(scratch))
        metrics_path = output / metrics_file_name(location)
        metrics_path.write_text(json.dumps(metrics, indent=2))
        written["metrics"] = str(metrics_path)
        measured_by = f"measured by `agepipe card` ({metrics_path.name})"
    card_path = output / CARD_FILE
    card_path.write_text(render_card(location, checkpoint, metrics, split_file(location, settings.split), measured_by))
    written["card"] = str(card_path)
    return written
