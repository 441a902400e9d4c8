"""In the wild: a model's own held-out faces pasted into photos and scored through the scoring job,
beside the same faces scored aligned (`agepipe card` reports it; benchmarks/wild.py adds the PyPI peer).

Photos are built from the model's held-out test split only: faces 60-240 px, some cut off by the photo's
border, rotated, brightened or darkened, blurred, on backgrounds cut from scikit-image's face-free photos,
0-4 faces a photo (some none), saved as JPEG at quality 60-95. Everything is drawn from one seed. Faces whole
in the photo and faces cut by its border are also reported apart. A detection matches a pasted face when its
box centre lies within a third of the face's size of the face's centre; each face matches at most once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from PIL import Image

from agepipe.config import AgeGroups, ScoreSettings, ScoringCrop
from agepipe.labels import age_group as group_name
from agepipe.labels import parse_utkface
from agepipe.metrics import GROUPINGS, interval_summary
from agepipe.model import WEIGHTS
from agepipe.score import run_score
from agepipe.shared_data import linked_folder

# scikit-image's bundled photos without a human face (the cat and the clock are kept on purpose:
# round, face-like shapes are where false faces come from).
FACE_FREE = ("coffee", "chelsea", "rocket", "hubble_deep_field", "coins", "moon", "page", "text", "horse",
             "clock", "brick", "grass", "gravel", "colorwheel", "immunohistochemistry", "retina", "cell",
             "logo", "microaneurysms")  # fmt: skip
# The bundled models' split of UTKFace by file name: their test faces are the ones never trained on.
BUNDLED_SPLIT = WEIGHTS / "default_split.parquet"
FACE_COUNTS, FACE_COUNT_P = (0, 1, 2, 3, 4), (0.12, 0.28, 0.25, 0.2, 0.15)


@dataclass(frozen=True)
class PhotoStyle:
    """What the built photos look like: their sizes (width, height), the faces' size range in pixels,
    the share of portrait photos stored sideways with an EXIF orientation tag, and sensor noise (the
    standard deviation of the background's grain, in grey levels)."""

    sizes: tuple[tuple[int, int], ...] = ((640, 480), (480, 640), (800, 600))
    face_sizes: tuple[float, float] = (60, 240)
    exif_rotated: float = 0.0
    noise: float = 0.0


WILD = PhotoStyle()
# Phone photos: 12 megapixels, faces of 120-900 px, half the portrait shots stored sideways.
PHONE = PhotoStyle(sizes=((4032, 3024), (3024, 4032)), face_sizes=(120, 900), exif_rotated=0.5, noise=3.0)
# YuNet's face box on a UTKFace image spans about this fraction of the image side (median over 306
# images: 0.97), so a face of size s is pasted as an image of side s / FACE_FRACTION.
FACE_FRACTION = 0.95


def face_free_photos() -> dict[str, np.ndarray]:
    """scikit-image's face-free photos as RGB uint8 arrays."""
    from skimage import data

    photos = {}
    for name in FACE_FREE:
        image = np.asarray(getattr(data, name)())
        if image.ndim == 2:
            image = np.stack([image] * 3, axis=-1)
        photos[name] = np.ascontiguousarray(image[:, :, :3]).astype(np.uint8)
    return photos


def face_free_set(folder: Path, seed: int, crops_per_photo: int = 4) -> list[Path]:
    """Each face-free photo whole, plus random crops of it at other scales, as JPEG files."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, image in face_free_photos().items():
        height, width = image.shape[:2]
        views = [image]
        for _ in range(crops_per_photo):
            side = int(rng.uniform(0.35, 0.8) * min(height, width))
            top, left = int(rng.integers(0, height - side + 1)), int(rng.integers(0, width - side + 1))
            views.append(cv2.resize(image[top : top + side, left : left + side], (480, 480)))
        for index, view in enumerate(views):
            path = folder / f"{name}_{index}.jpg"
            Image.fromarray(view).save(path, quality=90)
            paths.append(path)
    return paths


def held_out_faces(split_file: Path, images_root: Path) -> pd.DataFrame:
    """The test split's UTKFace faces with their labels (path, age, gender, race). The split file is a
    shipped model's (file names) or a training run's `split.parquet` (paths)."""
    split = pd.read_parquet(split_file)
    test = split.loc[split["split"] == "test"]
    names = sorted(set(test["name"] if "name" in test else test["path"].map(lambda p: Path(p).name)))
    rows = []
    for name in names:
        labels = parse_utkface(name)
        if "age" in labels and "race" in labels and (images_root / name).is_file():
            rows.append({"source": str(images_root / name), **labels})
    return pd.DataFrame(rows)


@dataclass
class PastedFace:
    """Where a face went: centre and face size in photo pixels."""

    center_x: float
    center_y: float
    face_size: float
    cut: bool  # the face crosses the photo's border


def background(photos: list[np.ndarray], size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A random crop of a face-free photo, resized to `size` (width, height), maybe mirrored."""
    image = photos[int(rng.integers(len(photos)))]
    height, width = image.shape[:2]
    aspect = size[0] / size[1]
    crop_w = int(min(width, height * aspect) * rng.uniform(0.6, 1.0))
    crop_h = int(crop_w / aspect)
    top, left = int(rng.integers(0, height - crop_h + 1)), int(rng.integers(0, width - crop_w + 1))
    view = cv2.resize(image[top : top + crop_h, left : left + crop_w], size, interpolation=cv2.INTER_AREA)
    return view[:, ::-1].copy() if rng.random() < 0.5 else view


def paste_face(photo: np.ndarray, face: np.ndarray, center: tuple[float, float], side: float, angle: float) -> None:
    """Put `face` (a square image) into `photo` scaled to `side`, rotated by `angle` degrees about its
    centre at `center`. The whole face image goes in, its edge softened by a pixel only: UTKFace's images
    end at the jaw and the hairline, so a wider feather would blend away part of the face itself (a
    feather of 6% of the side raised MAE by a year; hard edges kept it at the aligned figure). Only the
    region under the face is touched, so pasting into a 12-megapixel photo costs what the face does."""
    height, width = photo.shape[:2]
    n = face.shape[0]
    scale = side / n
    reach = side * 0.75 + 2  # half the rotated square's diagonal, and the feather
    left, top = max(int(center[0] - reach), 0), max(int(center[1] - reach), 0)
    right, bottom = min(int(center[0] + reach) + 1, width), min(int(center[1] + reach) + 1, height)
    if right <= left or bottom <= top:
        return
    transform = cv2.getRotationMatrix2D((n / 2, n / 2), angle, scale)
    transform[:, 2] += np.array(center) - np.array([n / 2, n / 2]) - np.array([left, top])
    size = (right - left, bottom - top)
    flags = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    warped = cv2.warpAffine(face, transform, size, flags=flags)
    alpha = cv2.warpAffine(np.ones((n, n), np.float32), transform, size, flags=cv2.INTER_LINEAR)
    alpha = cv2.GaussianBlur(alpha, (3, 3), 0.7)[:, :, None]
    region = photo[top:bottom, left:right]
    region[:] = (region * (1 - alpha) + warped * alpha).round().clip(0, 255).astype(np.uint8)


def place(face_size: float, width: int, height: int, rng: np.random.Generator) -> tuple[float, float]:
    """A face centre: one face in five crosses a random border by 10-40% of its size; the others lie
    with their whole image inside the photo where it fits."""
    side = face_size / FACE_FRACTION
    x = float(rng.uniform(min(side / 2, width / 2), max(width - side / 2, width / 2)))
    y = float(rng.uniform(min(side / 2, height / 2), max(height - side / 2, height / 2)))
    if rng.random() < 0.2:
        x, y = at_border((x, y), face_size * (0.5 - rng.uniform(0.1, 0.4)), int(rng.integers(4)), width, height)
    return x, y


def at_border(center: tuple[float, float], inside: float, edge: int, width: int, height: int) -> tuple[float, float]:
    """`center` moved to `inside` pixels from one border of a width x height photo (`edge`: 0 left,
    1 right, 2 top, 3 bottom), the other coordinate kept."""
    x, y = center
    x = inside if edge == 0 else width - inside if edge == 1 else x
    y = inside if edge == 2 else height - inside if edge == 3 else y
    return x, y


def compose_photo(
    faces: list[np.ndarray], backgrounds: list[np.ndarray], rng: np.random.Generator, style: PhotoStyle = WILD
) -> tuple[np.ndarray, list[PastedFace], int]:
    """One photo holding `faces` (UTKFace images), the placed faces, and the JPEG quality to save it at."""
    width, height = style.sizes[int(rng.integers(len(style.sizes)))]
    photo = background(backgrounds, (width, height), rng)
    photo = (photo * rng.uniform(0.75, 1.25)).clip(0, 255).astype(np.uint8)
    if style.noise:
        grain = (rng.standard_normal((height, width), dtype=np.float32) * style.noise).round().astype(np.int16)
        photo = np.clip(photo + grain[:, :, None], 0, 255).astype(np.uint8)
    placed: list[PastedFace] = []
    smallest, largest = style.face_sizes
    for face in faces:
        for _ in range(200):
            face_size = float(rng.uniform(smallest, min(largest, 0.6 * min(width, height))))
            center_x, center_y = place(face_size, width, height, rng)
            side = face_size / FACE_FRACTION
            if all(
                max(abs(center_x - p.center_x), abs(center_y - p.center_y)) > (side + p.face_size / FACE_FRACTION) / 2
                for p in placed
            ):
                break
        else:
            continue
        image = face.astype(np.float32) * rng.uniform(0.7, 1.3)
        if rng.random() < 0.35:
            image = cv2.GaussianBlur(image, (0, 0), rng.uniform(0.5, 2.0))
        paste_face(photo, image.clip(0, 255).astype(np.uint8), (center_x, center_y), side, rng.uniform(-15, 15))
        cut = min(center_x, center_y, width - center_x, height - center_y) < face_size / 2
        placed.append(PastedFace(center_x, center_y, face_size, cut))
    return photo, placed, int(rng.integers(60, 96))


def build_photos(
    faces: pd.DataFrame, folder: Path, count: int, seed: int, style: PhotoStyle = WILD, twins: Path | None = None
) -> pd.DataFrame:
    """`count` photos from `faces` (each face used at most once) into `folder`; one truth row per
    placed face (and none for photos without faces): photo path, centre, face size in the upright
    photo, source and labels. Portrait photos are stored sideways with an EXIF orientation tag at the
    style's share. With `twins`, each photo is also saved there shrunk to a quarter of its side (the
    same name, the same orientation tag)."""
    rng = np.random.default_rng(seed)
    folder = folder.resolve()  # the scoring job reports absolute paths
    folder.mkdir(parents=True, exist_ok=True)
    if twins is not None:
        twins.mkdir(parents=True, exist_ok=True)
    backgrounds = list(face_free_photos().values())
    order = rng.permutation(len(faces))
    cursor = 0
    truth = []
    for index in range(count):
        wanted = int(rng.choice(FACE_COUNTS, p=FACE_COUNT_P))
        chosen = faces.iloc[order[cursor : cursor + wanted]]
        cursor += wanted
        images = [np.asarray(Image.open(p).convert("RGB")) for p in chosen["source"]]
        photo, placed, quality = compose_photo(images, backgrounds, rng, style)
        sideways = photo.shape[0] > photo.shape[1] and rng.random() < style.exif_rotated
        path = folder / f"photo_{index:05d}.jpg"
        save_photo(photo, path, quality, sideways)
        if twins is not None:
            small = cv2.resize(photo, (photo.shape[1] // 4, photo.shape[0] // 4), interpolation=cv2.INTER_AREA)
            save_photo(small, twins / path.name, quality, sideways)
        for (_, face), spot in zip(chosen.iterrows(), placed, strict=False):
            truth.append({"path": str(path), **face.to_dict(), **spot.__dict__})
    return pd.DataFrame(truth)


def save_photo(photo: np.ndarray, path: Path, quality: int, sideways: bool) -> None:
    """Save as JPEG; `sideways` stores the pixels turned a quarter anticlockwise with EXIF orientation 6
    (turn clockwise to show), as a phone does with a portrait shot."""
    if not sideways:
        Image.fromarray(photo).save(path, quality=quality)
        return
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.ascontiguousarray(np.rot90(photo, 1))).save(path, quality=quality, exif=exif.tobytes())


def twin_truth(truth: pd.DataFrame, twins: Path) -> pd.DataFrame:
    """The truth rows of the quarter-size twins that `build_photos` saved in `twins`."""
    scaled = truth.assign(path=[str(twins.resolve() / Path(p).name) for p in truth["path"]])
    for column in ("center_x", "center_y", "face_size"):
        scaled[column] = scaled[column] / 4
    return scaled


def match_faces(truth: pd.DataFrame, found: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """Pair each placed face with the nearest unclaimed detection of its photo whose box centre is within
    a third of the face size; returns truth rows joined with their detection (NaN where missed) and the
    count of detections that matched no face. `found` has path, x1, y1, x2, y2 and prediction columns."""
    found = found.dropna(subset=["x1"]).reset_index(drop=True)
    centers = np.stack([(found["x1"] + found["x2"]) / 2, (found["y1"] + found["y2"]) / 2], axis=1)
    claimed: set[int] = set()
    matches: list[int | None] = []
    by_path = found.groupby("path").indices
    for face in truth.itertuples():
        best, best_distance = None, face.face_size / 3
        for i in by_path.get(face.path, []):
            distance = float(np.hypot(*(centers[i] - (face.center_x, face.center_y))))
            if i not in claimed and distance < best_distance:
                best, best_distance = int(i), distance
        if best is not None:
            claimed.add(best)
        matches.append(best)
    columns = [c for c in found.columns if c != "path"]
    detected = pd.DataFrame(
        [found.loc[m, columns].to_dict() if m is not None else {} for m in matches], columns=columns
    )
    return pd.concat([truth.reset_index(drop=True), detected.add_prefix("pred_")], axis=1), len(found) - len(claimed)


def labelled_predictions(matched: pd.DataFrame, groups: AgeGroups) -> pd.DataFrame:
    """The matched faces as `agepipe.metrics` reads predictions: `age`, `age_low`, `age_high` and `label_*`."""
    hit = matched.dropna(subset=["pred_age"])
    return pd.DataFrame(
        {
            "age": hit["pred_age"],
            "age_low": hit.get("pred_age_low", np.nan),
            "age_high": hit.get("pred_age_high", np.nan),
            "label_age": hit["age"],
            "label_gender": hit["gender"],
            "label_race": hit["race"],
            "label_age_group": [group_name(a, groups) for a in hit["age"]],
        }
    )


def face_metrics(matched: pd.DataFrame, false_faces: int, photos: int | None, groups: AgeGroups) -> dict:
    """Recall, false faces per photo (NaN for `photos=None`: faces scored alone, no photo to find them in), and
    matched faces' age MAE, age-group and gender accuracy, and their age intervals' coverage and mean width
    (NaN for a system without intervals)."""
    hit = matched.dropna(subset=["pred_age"])
    truth_groups = [group_name(a, groups) for a in hit["age"]]
    intervals = interval_summary(labelled_predictions(matched, groups))
    return {
        "faces": len(matched),
        "recall": len(hit) / max(len(matched), 1),
        "false faces / photo": float("nan") if photos is None else false_faces / max(photos, 1),
        "MAE": float((hit["pred_age"] - hit["age"]).abs().mean()),
        "bias": float((hit["pred_age"] - hit["age"]).mean()),
        "age-group acc": float(np.mean([p == t for p, t in zip(hit["pred_age_group"], truth_groups, strict=True)])),
        "gender acc": float((hit["pred_gender"] == hit["gender"]).mean()),
        "interval coverage": intervals["overall"]["coverage"] if intervals else float("nan"),
        "interval width": intervals["overall"]["mean_width"] if intervals else float("nan"),
    }


def interval_rows(intervals: dict[str, dict]) -> list[dict]:
    """`evaluate_wild`'s intervals as one table: per group, coverage and mean width aligned and in the photos."""
    rows = []
    for grouping in ("overall", *(f"by_{name}" for name in GROUPINGS)):
        photos, aligned = intervals["photos"][grouping], intervals["aligned"][grouping]
        if grouping == "overall":
            photos, aligned = [{"group": "all", **photos}], [{"group": "all", **aligned}]
        found = {row["group"]: row for row in photos}
        none_found = {"faces": 0, "coverage": float("nan"), "mean_width": float("nan")}
        for alone in aligned:
            in_photos = found.get(alone["group"], none_found)
            rows.append(
                {
                    "grouping": grouping.removeprefix("by_").replace("_", " "),
                    "group": alone["group"],
                    "faces": alone["faces"],
                    "aligned coverage": alone["coverage"],
                    "aligned width": alone["mean_width"],
                    "found in photos": in_photos["faces"],
                    "photos coverage": in_photos["coverage"],
                    "photos width": in_photos["mean_width"],
                }
            )
    return rows


def scored(images: Path, output: Path, model: str | None, every_face: bool) -> pd.DataFrame:
    """The scoring job's rows for the images under `images`: every face of a photo, or only the largest (an
    aligned face image, whose label is that face's)."""
    run_score(
        ScoreSettings(
            input=str(images), output=str(output), model=model, crop_overrides=ScoringCrop(all_faces=every_face)
        )
    )
    return pd.read_parquet(output)


def with_sources(truth: pd.DataFrame, aligned: pd.DataFrame) -> pd.DataFrame:
    """The truth rows joined with the scores of their source images aligned (`pred_*`; NaN where none)."""
    sources = {Path(source).name: source for source in truth["source"]}
    aligned = aligned.dropna(subset=["age"]).assign(source=[sources.get(Path(p).name) for p in aligned["path"]])
    return truth.merge(aligned.add_prefix("pred_"), left_on="source", right_on="pred_source", how="left")


@dataclass
class WildEvaluation:
    """One result row per system (and per system for faces whole in the photo and cut by its border), the age
    intervals by group of the faces found in the photos ("photos") and of the same faces aligned ("aligned";
    None for a model without calibration), and the truth: one row per placed face."""

    rows: list[dict]
    intervals: dict[str, dict | None]
    truth: pd.DataFrame = field(repr=False)


def evaluate_wild(
    folder: Path, faces: pd.DataFrame, photos: int, seed: int, model: str | None, aligned: pd.DataFrame | None = None
) -> WildEvaluation:
    """Build `photos` photos from `faces` (`held_out_faces`) under `folder`, score them with every face and the
    placed faces' images aligned, with `model` (a checkpoint path or URI, a bundled name, None the default).
    `aligned`: the scoring job's rows of the faces' images scored aligned already, reused by file name."""
    groups = AgeGroups()
    truth = build_photos(faces, folder / "photos", photos, seed)
    matched, false_faces = match_faces(truth, scored(folder / "photos", folder / "scores", model, every_face=True))
    if aligned is None:
        sources = linked_folder([Path(p) for p in truth["source"]], folder / "aligned")
        aligned = scored(sources, folder / "aligned-scores", model, every_face=False)
    joined = with_sources(truth, aligned)
    rows = [
        {"system": "agepipe, photos", **face_metrics(matched, false_faces, photos, groups)},
        {"system": "agepipe, same faces aligned", **face_metrics(joined, 0, None, groups)},
    ]
    for cut, where in ((False, "whole in the photo"), (True, "cut by the border")):
        for system, found in (("photos", matched), ("same faces aligned", joined)):
            subset = found[found["cut"] == cut]
            rows.append({"system": f"agepipe, {system}: faces {where}", **face_metrics(subset, 0, None, groups)})
    intervals = {
        name: interval_summary(labelled_predictions(found, groups))
        for name, found in (("photos", matched), ("aligned", joined))
    }
    return WildEvaluation(rows, intervals, truth)
