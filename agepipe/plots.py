"""Evaluation plots as PNG bytes, the Grad-CAM grid over faces re-cropped from their source images, and the
gallery of scored photos with each face's box, age interval and gender drawn on it.

Plots are drawn on matplotlib `Figure`s directly: no pyplot state, no GUI backend.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from PIL import Image, ImageDraw, ImageFont

from agepipe import storage
from agepipe.metrics import with_ages

logger = logging.getLogger(__name__)


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return buffer.getvalue()


def plot_predicted_vs_actual(frame: pd.DataFrame, max_points: int = 20_000, seed: int = 0) -> bytes:
    """Scatter of predicted against actual age with the ideal y = x line (a sample when large)."""
    rows = with_ages(frame)
    shown = rows.sample(n=max_points, random_state=seed) if len(rows) > max_points else rows
    figure = Figure(figsize=(5.5, 5))
    axes = figure.subplots()
    axes.scatter(shown["label_age"], shown["age"], s=8, alpha=0.4, edgecolors="none")
    top = float(max(rows["label_age"].max(), rows["age"].max(), 1)) * 1.05
    axes.plot([0, top], [0, top], color="crimson", linewidth=1.2, label="ideal (predicted = actual)")
    axes.set(xlim=(0, top), ylim=(0, top), xlabel="actual age (years)", ylabel="predicted age (years)")
    sampled = f" ({len(shown)} of {len(rows)} faces shown)" if len(shown) < len(rows) else ""
    axes.set_title(f"Predicted vs actual age{sampled}")
    axes.legend(loc="upper left")
    axes.grid(alpha=0.3)
    return _png(figure)


def plot_error_histogram(frame: pd.DataFrame) -> bytes:
    """Histogram of predicted minus actual age, with the bias and MAE in the title."""
    rows = with_ages(frame)
    error = rows["age"].astype(float) - rows["label_age"].astype(float)
    figure = Figure(figsize=(6, 4))
    axes = figure.subplots()
    axes.hist(error, bins=min(60, max(10, len(error) // 5)), color="steelblue")
    axes.axvline(0, color="crimson", linewidth=1.2)
    axes.set(xlabel="predicted - actual age (years)", ylabel="faces")
    axes.set_title(f"Age error: MAE {error.abs().mean():.2f}, bias {error.mean():+.2f} years")
    axes.grid(alpha=0.3)
    return _png(figure)


def plot_age_distribution(frame: pd.DataFrame) -> bytes:
    """Histogram of predicted ages, with actual ages beside them when labels are known."""
    figure = Figure(figsize=(6, 4))
    axes = figure.subplots()
    bins = np.arange(0, 105, 5)
    axes.hist(frame["age"].dropna(), bins=bins, alpha=0.6, label="predicted")
    if "label_age" in frame and frame["label_age"].notna().any():
        axes.hist(frame["label_age"].dropna(), bins=bins, alpha=0.6, label="actual")
    axes.set(xlabel="age (years)", ylabel="faces", title="Age distribution")
    axes.legend()
    axes.grid(alpha=0.3)
    return _png(figure)


def plot_confusion_matrix(confusion: pd.DataFrame) -> bytes:
    """Age-group confusion matrix: colour is the share of each actual group, text the count."""
    counts = confusion.to_numpy()
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    figure = Figure(figsize=(1.2 * len(confusion.columns) + 2.5, 1.0 * len(confusion.index) + 2))
    axes = figure.subplots()
    image = axes.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    axes.set_xticks(range(len(confusion.columns)), confusion.columns, rotation=30, ha="right")
    axes.set_yticks(range(len(confusion.index)), confusion.index)
    for (row, column), count in np.ndenumerate(counts):
        color = "white" if shares[row, column] > 0.5 else "black"
        axes.text(column, row, str(count), ha="center", va="center", color=color)
    axes.set(xlabel="predicted age group", ylabel="actual age group", title="Age-group confusion matrix")
    figure.colorbar(image, ax=axes, label="share of actual group")
    return _png(figure)


def plot_mae_by_group(tables: dict[str, pd.DataFrame]) -> bytes:
    """Bars of MAE per age group, gender and race (one panel per non-empty table), faces on each bar."""
    shown = {title: table for title, table in tables.items() if not table.empty}
    figure = Figure(figsize=(4.5 * max(len(shown), 1), 4))
    panels = np.atleast_1d(figure.subplots(1, max(len(shown), 1)))
    for axes, (title, table) in zip(panels, shown.items(), strict=False):
        bars = axes.bar(table["group"], table["mae"], color="teal")
        axes.bar_label(bars, labels=[f"n={n}" for n in table["faces"]], fontsize=8)
        axes.set(title=f"MAE by {title}", ylabel="MAE (years)")
        axes.tick_params(axis="x", rotation=30)
        axes.grid(axis="y", alpha=0.3)
    return _png(figure)


def plot_training_curves(run_metrics: pd.DataFrame) -> bytes:
    """Loss, MAE and validation accuracies per epoch of a training run; dashed lines mark a new phase."""
    panels = [
        ("loss", ["train_loss", "val_loss"]),
        ("MAE (years)", ["train_mae", "val_mae"]),
        ("accuracy", ["val_group_accuracy", "val_gender_accuracy"]),
    ]
    panels = [(title, [c for c in columns if c in run_metrics]) for title, columns in panels]
    panels = [(title, columns) for title, columns in panels if columns]
    epochs = run_metrics["epoch"] if "epoch" in run_metrics else pd.Series(range(len(run_metrics)))
    figure = Figure(figsize=(4.5 * max(len(panels), 1), 3.8))
    phase_starts = []
    if "phase" in run_metrics:
        changed = run_metrics["phase"].ne(run_metrics["phase"].shift()) & (run_metrics.index > 0)
        phase_starts = list(epochs[changed])
    for axes, (title, columns) in zip(np.atleast_1d(figure.subplots(1, max(len(panels), 1))), panels, strict=False):
        for column in columns:
            axes.plot(epochs, run_metrics[column], marker="o", label=column)
        for start in phase_starts:
            axes.axvline(start - 0.5, color="gray", linestyle="--", linewidth=1)
        axes.set(title=title, xlabel="epoch")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.legend(fontsize=8)
        axes.grid(alpha=0.3)
    return _png(figure)


@dataclass
class GradcamTile:
    """One face for the Grad-CAM grid: the crop, its overlay and a caption."""

    crop: np.ndarray
    overlay: np.ndarray
    caption: str


def plot_gradcam_grid(tiles: Sequence[GradcamTile], columns: int = 4) -> bytes:
    """Each face as its crop beside its Grad-CAM overlay, `columns` faces to a row."""
    rows = max(1, -(-len(tiles) // columns))
    figure = Figure(figsize=(3.2 * columns, 1.9 * rows))
    grid = np.atleast_2d(figure.subplots(rows, columns))
    for axes in grid.flat:
        axes.axis("off")
    for axes, tile in zip(grid.flat, tiles, strict=False):
        height = max(tile.crop.shape[0], tile.overlay.shape[0])
        pair = np.concatenate([_pad_to(tile.crop, height), _pad_to(tile.overlay, height)], axis=1)
        axes.imshow(pair)
        axes.set_title(tile.caption, fontsize=9)
    figure.suptitle("Grad-CAM: regions driving the predicted age (face | overlay)")
    return _png(figure)


def _pad_to(image: np.ndarray, height: int) -> np.ndarray:
    return np.pad(image, ((0, height - image.shape[0]), (0, 0), (0, 0)))


# --- Grad-CAM over source images ---


def gradcam_tiles(predictor: Any, faces: pd.DataFrame) -> list[GradcamTile]:
    """Grad-CAM tiles for faces of a predictions frame: each source image is re-read by `path`
    and cropped by the Predictor; a face that cannot be re-read or re-found is skipped."""
    from agepipe.explain import explain_crop

    tiles = []
    for face in faces.itertuples(index=False):
        try:
            image_rows = predictor.crop_images([storage.read_bytes(face.path)])[0]
        except (OSError, storage.StorageError) as exc:
            logger.warning("Grad-CAM: cannot read %s: %s", face.path, exc)
            continue
        crops = [r["crop"] for r in image_rows if r["face_index"] == face.face_index and r["crop"] is not None]
        if not crops:
            logger.warning("Grad-CAM: face %s of %s not found again", face.face_index, face.path)
            continue
        caption = f"predicted {face.age:.0f}"
        label_age = getattr(face, "label_age", None)
        if label_age is not None and pd.notna(label_age):
            caption += f", actual {label_age:.0f}"
        tiles.append(GradcamTile(crops[0], explain_crop(predictor, crops[0]), caption))
    return tiles


# --- the gallery of scored photos ---


def face_label(age: float, low: float | None, high: float | None, gender: str | None) -> str:
    """The age and its interval in whole years, then the gender, as the upload page draws them on a photo:
    `31 (25-38), female`."""
    interval = "" if low is None or pd.isna(low) else f" ({low:.0f}-{high:.0f})"
    return f"{age:.0f}{interval}" + (f", {gender}" if isinstance(gender, str) else "")


@dataclass
class GalleryPhoto:
    """One scored photo with its faces drawn on it, and its widest interval (NaN without intervals)."""

    path: str
    jpeg: bytes
    labels: list[str]
    widest: float


def interval_widths(faces: pd.DataFrame) -> pd.Series:
    """Each face's interval width in years (NaN where the model had no calibration)."""
    if "age_low" not in faces:
        return pd.Series(np.nan, index=faces.index)
    return faces["age_high"].astype(float) - faces["age_low"].astype(float)


def widest_first(faces: pd.DataFrame) -> list[str]:
    """Photo paths by their faces' widest interval, widest first (photos without intervals last)."""
    widest = interval_widths(faces).groupby(faces["path"]).max()
    return list(widest.sort_values(ascending=False, na_position="last", kind="stable").index)


def label_top(top: float, bottom: float, height: float, photo_height: float) -> float:
    """Where a face's label of `height` goes: above its box, else below it, else inside its top edge (a face
    that fills the photo)."""
    if top >= height:
        return top - height
    return bottom if bottom + height <= photo_height else top


def draw_faces(image: np.ndarray, faces: pd.DataFrame, side: int) -> tuple[bytes, list[str]]:
    """The photo shrunk to at most `side` pixels, each face's box and label drawn; JPEG bytes and the labels."""
    photo = Image.fromarray(image)
    scale = min(1.0, side / max(photo.size))
    photo = photo.resize((max(1, round(photo.width * scale)), max(1, round(photo.height * scale))))
    draw = ImageDraw.Draw(photo)
    line = max(2, round(max(photo.size) / 200))
    font = ImageFont.load_default(size=max(11, line * 6))
    labels = []
    for face in faces.itertuples(index=False):
        box = [float(v) * scale for v in (face.x1, face.y1, face.x2, face.y2)]
        label = face_label(face.age, getattr(face, "age_low", None), getattr(face, "age_high", None), face.gender)
        labels.append(label)
        draw.rectangle(box, outline=(0, 224, 138), width=line)
        left, top, right, bottom = draw.textbbox((0, 0), label, font=font)
        height = bottom - top + 2 * line
        y = label_top(box[1], box[3], height, photo.height)
        draw.rectangle([box[0], y, box[0] + right - left + 2 * line, y + height], fill=(0, 0, 0))
        draw.text((box[0] + line, y + line - top), label, fill=(255, 255, 255), font=font)
    buffer = io.BytesIO()
    photo.save(buffer, format="JPEG", quality=85)
    return buffer.getvalue(), labels


def interval_gallery(faces: pd.DataFrame, photos: int, side: int = 480) -> list[GalleryPhoto]:
    """Up to `photos` scored photos, the widest intervals first, each re-read from its path with its faces
    drawn on it; a photo that cannot be read again is left out with a warning."""
    from agepipe.images import ImageError, decode

    gallery = []
    for path in widest_first(faces):
        if len(gallery) == photos:
            break
        try:
            image = decode(storage.read_bytes(path))
        except (OSError, storage.StorageError, ImageError) as exc:
            logger.warning("gallery: cannot read %s: %s", path, exc)
            continue
        own = faces[faces["path"] == path]
        jpeg, labels = draw_faces(image, own, side)
        gallery.append(GalleryPhoto(path, jpeg, labels, float(interval_widths(own).max())))
    return gallery
