"""`agepipe card`: a user's own checkpoint measured on a sample of its test split, the bundled models' cards from
their stored metrics, and the shipped card being the command's."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd

from agepipe.card import CARD_FILE, bundled_names, metrics_file_name, records_checkpoint, stored_metrics, write_card
from agepipe.config import PROJECT_ROOT, CardSettings
from agepipe.model import BUNDLED_MODELS, DEFAULT_MODEL, INT8_GRAPH, WEIGHTS, read_checkpoint
from agepipe.wild import BUNDLED_SPLIT

# The Model Cards sections (Mitchell et al.), as the card heads them.
SECTIONS = (
    "## Model details",
    "## Intended use",
    "## Factors",
    "## Metrics",
    "## Evaluation data",
    "## Training data",
    "## Ethical considerations",
    "## Caveats and recommendations",
)


def assert_card_shape(card: str) -> None:
    assert len(card.splitlines()) <= 200
    positions = [card.index(section) for section in SECTIONS]
    assert positions == sorted(positions)
    assert "non-commercial research only" in card


def test_a_users_checkpoint_gets_its_card_measured_on_its_own_test_faces(utkface_dir, yunet_weights, tmp_path) -> None:
    run = tmp_path / "run"  # as `agepipe train` leaves a run folder: the checkpoint and its split beside it
    run.mkdir()
    shutil.copy(BUNDLED_MODELS["fast"], run / "model.pt")
    shutil.copy(BUNDLED_SPLIT, run / "split.parquet")
    output = tmp_path / "card"
    written = write_card(CardSettings(model=str(run / "model.pt"), output=str(output), faces=12, wild_photos=5))
    card = Path(written["card"]).read_text()
    assert_card_shape(card)
    metrics = json.loads(Path(written["metrics"]).read_text())
    assert Path(written["metrics"]) == output / "model_metrics.json"
    # Every sampled test face scored aligned, the photos holding some of them, and the report beside the card.
    assert metrics["test"]["faces"] == metrics["test_coverage"]["images"] == 12
    rows = {row["system"]: row for row in metrics["wild"]}
    assert 0 < rows["agepipe, photos"]["faces"] == rows["agepipe, same faces aligned"]["faces"] <= 12
    assert (output / "report" / "report.html").is_file()
    assert f"| aligned age MAE (years) | {metrics['test']['age']['mae']:.2f} |" in card
    assert sum(row["faces"] for row in metrics["test"]["by_race"]) == 12
    assert "### Age intervals" in card and "measured by `agepipe card`" in card
    assert "`model.pt`" in card and "--model fast" not in card  # a user's file, not a bundled name
    assert records_checkpoint(metrics, read_checkpoint(str(run / "model.pt")))
    # A sample's metrics record the checkpoint, but a card of every test face does not reuse them.
    assert stored_metrics(str(run / "model.pt"), read_checkpoint(str(run / "model.pt")), [output], 5) is None


def test_the_default_models_card_reuses_its_stored_metrics_and_shows_the_other_bundled_models(tmp_path) -> None:
    written = write_card(CardSettings(model="default", output=str(tmp_path)))
    assert set(written) == {"card"}  # nothing measured
    card = Path(written["card"]).read_text()
    assert_card_shape(card)
    stored = json.loads(DEFAULT_MODEL.with_name(f"{DEFAULT_MODEL.stem}_metrics.json").read_text())
    assert f"| aligned age MAE (years) | {stored['test']['age']['mae']:.2f} |" in card
    assert f"stored in `{DEFAULT_MODEL.stem}_metrics.json`" in card
    others = {path: " / ".join(names) for path, names in bundled_names().items() if path != str(DEFAULT_MODEL)}
    assert others and f"| metric | this model | {' | '.join(others.values())} |" in card
    other_maes = [json.loads(Path(p).with_name(metrics_file_name(p)).read_text())["test"]["age"]["mae"] for p in others]
    assert (
        f"| aligned age MAE (years) | {stored['test']['age']['mae']:.2f} | "
        + " | ".join(f"{mae:.2f}" for mae in other_maes)
        in card
    )
    split = pd.read_parquet(BUNDLED_SPLIT)["split"].value_counts()
    assert f"test: {split['test']}, train: {split['train']}, val: {split['val']}" in card


def test_stored_metrics_record_only_their_own_checkpoint() -> None:
    fast = read_checkpoint(str(BUNDLED_MODELS["fast"]))
    for name, path in BUNDLED_MODELS.items():
        metrics = json.loads(path.with_name(f"{path.stem}_metrics.json").read_text())
        assert records_checkpoint(metrics, fast) == (path == BUNDLED_MODELS["fast"]), name
    # The same network calibrated again (another int8 graph or age shift), or scoring in float, is not the
    # checkpoint its metrics measured.
    metrics = json.loads(BUNDLED_MODELS["fast"].with_name("fast_metrics.json").read_text())
    recalibrated = {**fast, "int8": {**fast["int8"], "age_shift": {"knot_ages": [30.0], "shifts": [0.0]}}}
    assert not records_checkpoint(metrics, recalibrated)
    assert not records_checkpoint(metrics, {key: value for key, value in fast.items() if key != INT8_GRAPH})


def test_the_shipped_card_and_the_docs_card_are_what_agepipe_card_writes_for_the_default_model(tmp_path) -> None:
    written = write_card(CardSettings(model="default", output=str(tmp_path)))
    card = Path(written["card"]).read_text()
    assert (WEIGHTS / CARD_FILE).read_text() == card, "run `agepipe card --model default --output agepipe/weights`"
    assert (PROJECT_ROOT / "docs" / "model-card.md").read_text() == card, "copy agepipe/weights/MODEL_CARD.md to docs/"
