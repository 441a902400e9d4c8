"""How much of what a face cut by the photo's border costs comes from its landmarks: each held-out face is
pasted whole at the photo's centre and, on the same background, where the border cuts a share of it off;
the cut face is cropped once with the landmarks YuNet finds on it and once with those it found on the whole
face (moved by the offset between the two placements), and both crops are scored.

    .venv/bin/python benchmarks/cut_landmarks.py [--faces 300] [--model PATH] [--split PATH] [--results NAME]
"""

from __future__ import annotations

import sys
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import write_results  # noqa: E402
from wild import at_border, face_free_photos, paste_face, sampled_held_out_faces  # noqa: E402

from agepipe.detectors import Face  # noqa: E402
from agepipe.faces import crop_face  # noqa: E402
from agepipe.predict import Predictor  # noqa: E402

CENTRE = (320.0, 240.0)
SIDE = 200
SHARES = (0.25, 0.4)


def nearest_face(faces: list[Face], centre: tuple[float, float]) -> Face | None:
    """The detected face whose box centre lies nearest `centre`, if any has landmarks."""
    marked = [face for face in faces if face.landmarks is not None]
    if not marked:
        return None
    return min(
        marked, key=lambda f: np.hypot((f.box[0] + f.box[2]) / 2 - centre[0], (f.box[1] + f.box[3]) / 2 - centre[1])
    )


def moved(face: Face, dx: float, dy: float) -> Face:
    landmarks = tuple((x + dx, y + dy) for x, y in face.landmarks)
    x1, y1, x2, y2 = face.box
    return Face((x1 + dx, y1 + dy, x2 + dx, y2 + dy), face.score, landmarks)


def eye_distance(face: Face) -> float:
    return float(np.hypot(*np.subtract(face.landmarks[1], face.landmarks[0])))


def main() -> None:
    args, faces = sampled_held_out_faces(__doc__.splitlines()[0], "cut-landmarks")
    predictor = Predictor(args.model, {"all_faces": True})
    backgrounds = list(face_free_photos().values())
    rng = np.random.default_rng(0)
    errors = {
        share: {"whole": [], "cut, its own landmarks": [], "cut, the whole face's landmarks": []} for share in SHARES
    }
    shifts = {share: [] for share in SHARES}
    scales = {share: [] for share in SHARES}
    for face in faces.itertuples():
        image = np.asarray(Image.open(face.source).convert("RGB"))
        for share in SHARES:
            background = cv2.resize(backgrounds[int(rng.integers(len(backgrounds)))], (640, 480))
            centre = at_border(CENTRE, SIDE * (0.5 - share), int(rng.integers(4)), 640, 480)
            whole, cut = background.copy(), background.copy()
            paste_face(whole, image, CENTRE, SIDE, 0)
            paste_face(cut, image, centre, SIDE, 0)
            found_whole = nearest_face(predictor.detector.detect([whole])[0], CENTRE)
            found_cut = nearest_face(predictor.detector.detect([cut])[0], centre)
            if found_whole is None or found_cut is None:
                continue
            transplanted = moved(found_whole, centre[0] - CENTRE[0], centre[1] - CENTRE[1])
            crops = [
                crop_face(whole, found_whole, predictor.crop)[0],
                crop_face(cut, found_cut, predictor.crop)[0],
                crop_face(cut, transplanted, predictor.crop)[0],
            ]
            for name, prediction in zip(errors[share], predictor.predict_crops(crops), strict=True):
                errors[share][name].append(prediction["age"] - face.age)
            offsets = np.subtract(found_cut.landmarks, transplanted.landmarks)
            shifts[share].append(float(np.hypot(offsets[:, 0], offsets[:, 1]).mean()))
            scales[share].append(eye_distance(found_cut) / eye_distance(transplanted))
    rows = [
        {
            "cut off": f"{share:.0%}",
            "crop": name,
            "faces": len(values),
            "MAE": float(np.mean(np.abs(values))),
            "bias": float(np.mean(values)),
            "landmark shift (px, median)": float(np.median(shifts[share])),
            "eye distance ratio (median)": float(np.median(scales[share])),
        }
        for share in SHARES
        for name, values in errors[share].items()
    ]
    write_results(
        args.results,
        rows,
        [
            f"`benchmarks/cut_landmarks.py --faces {args.faces}"
            + (f" --model {args.model} --split {args.split}" if args.model else "")
            + "`"
            + f": {args.faces} faces of the test split in {args.split.name} at {SIDE} px on a photo background,"
            " whole at the centre and cut by a random border; faces where YuNet found no face in either photo are"
            " left out. Landmark shift: the cut face's landmarks against the whole face's moved to the cut"
            " placement, mean over the five points; eye distance ratio: cut over whole.",
        ],
    )


if __name__ == "__main__":
    main()
