"""Ship finished training runs as the bundled models, measured, with the default model's card.

    .venv/bin/python scripts/make_default_model.py --run out/runs/default-1 [out/runs/default-2 ...]
    .venv/bin/python scripts/make_default_model.py --card-only

The first run's network ships as the default model (fp16, as `agepipe export` writes it); several runs ship as
the bundled ensemble too. Each shipped file is calibrated (`agepipe.calibrate`) on the val faces of the crop dataset
the networks trained on (`--calibration-data` where it is elsewhere) and measured by `agepipe card --recompute` on
the runs' one test split, saved by file name beside them; the default model's card (which shows the others beside
it) is written into the package and the docs. A run may also be given as its trained checkpoint, which records its
settings (at least one run folder is needed: its split.parquet names the test faces). `--card-only` rewrites the
two cards from the stored metrics.
"""

from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from agepipe.calibrate import calibrate_checkpoint, recorded_data
from agepipe.card import CARD_FILE, metrics_file_name, write_card
from agepipe.config import PROJECT_ROOT, CardSettings
from agepipe.model import BUNDLED_MODELS, DEFAULT_MODEL, WEIGHTS, export_for_sharing, read_checkpoint
from agepipe.wild import BUNDLED_SPLIT

DOCS_CARD = PROJECT_ROOT / "docs" / "model-card.md"
# What `train_data.stratified_split` makes a run's split from, beside the crop dataset's faces.
SPLIT_SETTINGS = ("data", "seed", "val_fraction", "test_fraction", "limit")


@dataclass
class Network:
    """One trained network to ship: its checkpoint, recorded settings and split (None for a bare checkpoint)."""

    checkpoint: str
    settings: dict
    split: pd.DataFrame | None


def read_network(source: Path) -> Network:
    """A training run folder (model.pt, settings.json, split.parquet), or a trained checkpoint."""
    if source.is_file():
        return Network(str(source), read_checkpoint(str(source))["train_settings"], None)
    split = pd.read_parquet(source / "split.parquet")
    split = split.assign(name=split["path"].map(lambda p: Path(p).name))[["name", "face_index", "split"]]
    return Network(str(source / "model.pt"), json.loads((source / "settings.json").read_text()), split)


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


def write_default_card(out: Path) -> None:
    """The default model's card from the stored metrics in `out`, and its copy in the docs when it ships."""
    written = write_card(
        CardSettings(model=str(out / DEFAULT_MODEL.name), output=str(out), split=str(out / BUNDLED_SPLIT.name))
    )
    if out.resolve() == WEIGHTS.resolve():
        shutil.copy(written["card"], DOCS_CARD)
    print(Path(written["card"]).read_text())


def ship(networks: list[Network], out: Path, report: Path, calibration_data: str | None, wild_photos: int) -> None:
    """Export, calibrate and measure the default model (the first network) and, for several, the ensemble."""
    shared_split(networks).to_parquet(out / BUNDLED_SPLIT.name, index=False)
    shipped = {DEFAULT_MODEL: [networks[0].checkpoint]}
    if len(networks) > 1:
        ensembles = [path for path in BUNDLED_MODELS.values() if path != DEFAULT_MODEL]
        shipped[ensembles[0]] = [network.checkpoint for network in networks]
    for bundled, sources in shipped.items():
        model = str(out / bundled.name)
        export_for_sharing(sources, model)
        data = calibration_data or recorded_data(read_checkpoint(model))
        if not data:
            raise SystemExit("the networks' training data is not here: give --calibration-data (val faces)")
        calibrate_checkpoint(model, data)
        measured = report / bundled.stem
        write_card(
            CardSettings(
                model=model,
                output=str(measured),
                split=str(out / BUNDLED_SPLIT.name),
                wild_photos=wild_photos,
                recompute=True,
            )
        )
        shutil.copy(measured / metrics_file_name(model), out / metrics_file_name(model))
    write_default_card(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", nargs="+", help="training run folders or trained checkpoints, the default's first")
    parser.add_argument("--card-only", action="store_true", help=f"only rewrite {CARD_FILE} and {DOCS_CARD.name}")
    parser.add_argument("--out", type=Path, default=WEIGHTS, help="folder of the shipped files (default: ship them)")
    parser.add_argument("--report", type=Path, default=Path("out/default-model-report"), help="evaluation reports")
    parser.add_argument("--calibration-data", help="crop dataset whose val faces calibrate the intervals")
    parser.add_argument("--wild-photos", type=int, default=1100, help="in-the-wild photos (1100: every test face)")
    args = parser.parse_args()
    if args.card_only:
        write_default_card(args.out)
        return
    if not args.run:
        parser.error("give --run (or --card-only)")
    args.out.mkdir(parents=True, exist_ok=True)
    ship([read_network(Path(run)) for run in args.run], args.out, args.report, args.calibration_data, args.wild_photos)


if __name__ == "__main__":
    main()
