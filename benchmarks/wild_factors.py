"""What costs accuracy in photos, one factor at a time: the same held-out faces scored aligned, then
pasted into a 640x480 photo with one change each (background, size, rotation, blur, JPEG, the photo's
border cutting part of the face off).

    .venv/bin/python benchmarks/wild_factors.py [--faces 300] [--model PATH] [--split PATH] [--results NAME]

Each face goes through the Predictor as `agepipe score` runs it (the model's crop settings, every face);
the face found nearest the pasted centre is the one measured.
"""

from __future__ import annotations

import io
import sys
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import write_results  # noqa: E402
from wild import at_border, face_free_photos, paste_face, sampled_held_out_faces  # noqa: E402

from agepipe.augment import fill_mask  # noqa: E402
from agepipe.faces import FILL_COLOUR  # noqa: E402
from agepipe.predict import Predictor  # noqa: E402

CENTRE = (320.0, 240.0)


def jpeg(image: np.ndarray, quality: int) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    return np.asarray(Image.open(buffer).convert("RGB"))


Photo = tuple[np.ndarray, tuple[float, float] | None]


def factors(backgrounds: list[np.ndarray], rng: np.random.Generator) -> dict[str, Callable[[np.ndarray], Photo]]:
    """Name -> a function from a UTKFace image to the photo that tests that factor alone and where the
    face's centre lies in it (None for the face image itself)."""

    def photo(
        face: np.ndarray,
        textured: bool = True,
        side: float = 200,
        angle: float = 0,
        centre: tuple[float, float] = CENTRE,
    ) -> Photo:
        if textured:
            canvas = cv2.resize(backgrounds[int(rng.integers(len(backgrounds)))], (640, 480))
        else:
            canvas = np.full((480, 640, 3), FILL_COLOUR, np.uint8)
        paste_face(canvas, face, centre, side, angle)
        return canvas, centre

    def cut(face: np.ndarray, share: float) -> Photo:
        """The face image crossing a random border of the photo by `share` of its side."""
        return photo(face, centre=at_border(CENTRE, 200 * (0.5 - share), int(rng.integers(4)), 640, 480))

    def compressed(face: np.ndarray, quality: int) -> Photo:
        canvas, centre = photo(face)
        return jpeg(canvas, quality), centre

    return {
        "aligned (the face image alone)": lambda face: (face, None),
        "on the fill colour, 200 px": lambda face: photo(face, textured=False),
        "on a photo background, 200 px": photo,
        "80 px": lambda face: photo(face, side=80),
        "rotated 12 degrees": lambda face: photo(face, angle=12),
        "blurred (sigma 1.5)": lambda face: photo(cv2.GaussianBlur(face, (0, 0), 1.5)),
        "JPEG quality 70": lambda face: compressed(face, 70),
        "brightness x0.7": lambda face: photo((face * 0.7).astype(np.uint8)),
        "a quarter cut off by the border": lambda face: cut(face, 0.25),
        "40% cut off by the border": lambda face: cut(face, 0.4),
    }


RESTORED_FILL = "on a photo background, the aligned crop's fill put back"


def restored_fill_error(predictor: Predictor, crops: dict[str, np.ndarray], age: float) -> float:
    """The background photo's crop with the pixels where the aligned crop shows the fill colour (past
    the face image's border) set to that colour again: how much of the background's effect comes
    through the part of the crop that lies outside the face image."""
    aligned, photo = crops.get("aligned (the face image alone)"), crops.get("on a photo background, 200 px")
    if aligned is None or photo is None:
        return np.nan
    restored = photo.copy()
    restored[fill_mask(torch.from_numpy(aligned).permute(2, 0, 1))] = FILL_COLOUR
    return predictor.predict_crops([restored])[0]["age"] - age


def main() -> None:
    args, faces = sampled_held_out_faces(__doc__.splitlines()[0], "wild-factors")
    predictor = Predictor(args.model, {"all_faces": True})
    rng = np.random.default_rng(0)
    variants = factors(list(face_free_photos().values()), rng)
    errors: dict[str, list[float]] = {name: [] for name in [*variants, RESTORED_FILL]}
    for face in faces.itertuples():
        image = np.asarray(Image.open(face.source).convert("RGB"))
        crops = {}
        for name, make in variants.items():
            picture, centre = make(image)
            rows = [r for r in predictor.crop_images([picture])[0] if r["crop"] is not None]
            if not rows:
                errors[name].append(np.nan)
                continue
            if centre is None:
                nearest = rows[0]
            else:
                nearest = min(
                    rows,
                    key=lambda r: np.hypot((r["x1"] + r["x2"]) / 2 - centre[0], (r["y1"] + r["y2"]) / 2 - centre[1]),
                )
            crops[name] = nearest["crop"]
            errors[name].append(predictor.predict_crops([nearest["crop"]])[0]["age"] - face.age)
        errors[RESTORED_FILL].append(restored_fill_error(predictor, crops, face.age))
    rows = []
    aligned = np.nanmean(np.abs(errors[next(iter(errors))]))
    for name, values in errors.items():
        values = np.array(values)
        mae = float(np.nanmean(np.abs(values)))
        rows.append({"photo": name, "found": float(np.isfinite(values).mean()), "MAE": mae,
                     "MAE - aligned": mae - aligned, "bias": float(np.nanmean(values))})  # fmt: skip
    write_results(
        args.results,
        rows,
        [
            f"`benchmarks/wild_factors.py --faces {args.faces}`"
            + (f" --model {args.model}" if args.model else "")
            + f": {args.faces} faces of the test split in {args.split.name}, each pasted whole at the photo's centre"
            " but where the border cuts it (its centre a quarter or a tenth of its side inside a random edge).",
        ],
    )


if __name__ == "__main__":
    main()
