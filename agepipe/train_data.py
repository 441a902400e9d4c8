"""The training data: a seeded split stratified by age group and made by image, balancing copies per
age, and the Ray Data datasets of each split that feed the Ray Train workers.

It imports no PyTorch: Ray Data's read and filter tasks load this module (`SplitFilter`), and in a task
process PyTorch's import would cost seconds and hundreds of MB before the first row.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from agepipe import storage
from agepipe.config import AgeGroups, TrainSettings
from agepipe.labels import group_index
from agepipe.registry import Registry

LABEL_COLUMNS = ["path", "face_index", "age", "gender", "race", "error", "detector"]


def usable_rows(frame: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, int]]:
    """Rows with a face and an age; counts of what was left out and why."""
    has_error = frame["error"].notna()
    no_age = frame["age"].isna() & ~has_error
    dropped = {"error_or_no_face": int(has_error.sum()), "no_age": int(no_age.sum())}
    return frame[~has_error & ~no_age].reset_index(drop=True), dropped


def stratified_split(
    frame: pd.DataFrame, groups: AgeGroups, val_fraction: float, test_fraction: float, seed: int
) -> pd.Series:
    """'train'/'val'/'test' per row, stratified by age group, by image path (all faces of an
    image land in one split), deterministic for a seed."""
    images = frame.drop_duplicates("path")[["path", "age"]].sort_values("path")
    images["group"] = [group_index(a, groups) for a in images["age"]]
    rng = np.random.default_rng(seed)
    assignment: dict[str, str] = {}
    for _, members in images.groupby("group", sort=True):
        paths = members["path"].to_numpy()[rng.permutation(len(members))]
        n_test = int(round(len(paths) * test_fraction))
        n_val = int(round(len(paths) * val_fraction))
        for i, path in enumerate(paths):
            assignment[path] = "test" if i < n_test else "val" if i < n_test + n_val else "train"
    return frame["path"].map(assignment)


def balancing_weights(ages: pd.Series, max_per_age: int, min_per_age: int, seed: int) -> np.ndarray:
    """Copies of each training row: ages above `max_per_age` are subsampled to it (0 copies for the
    rest), ages with fewer than `min_per_age` rows are repeated up to it (augmentation makes the
    copies differ)."""
    rng = np.random.default_rng(seed)
    copies = np.ones(len(ages), dtype=np.int64)
    rounded = ages.round().astype(int).to_numpy()
    for age in np.unique(rounded):
        index = np.flatnonzero(rounded == age)
        if len(index) > max_per_age:
            copies[rng.choice(index, len(index) - max_per_age, replace=False)] = 0
        elif len(index) < min_per_age:
            extra = min_per_age - len(index)
            np.add.at(copies, rng.choice(index, extra, replace=True), 1)
    return copies


def age_years(ages: np.ndarray, max_age: int) -> np.ndarray:
    """Each age as its whole year 0..max_age: an index into a per-year table."""
    return np.clip(np.round(ages), 0, max_age).astype(int)


def smoothed_age_density(ages: np.ndarray, max_age: int, sigma: float = 2.0) -> np.ndarray:
    """Training faces per year of age 0..max_age, smoothed by a Gaussian of `sigma` years (label
    distribution smoothing: a year's neighbours share its faces' appearance, so a rare year between common
    ones is not rare), reflected at the ends."""
    counts = np.bincount(age_years(ages, max_age), minlength=max_age + 1).astype(float)
    reach = int(3 * sigma)
    kernel = np.exp(-(np.arange(-reach, reach + 1) ** 2) / (2 * sigma**2))
    return np.convolve(np.pad(counts, reach, mode="reflect"), kernel / kernel.sum(), mode="valid")


# How the age loss weighs a face, from its age's smoothed density: "none" weighs every face alike;
# "sqrt_inverse" by the density's inverse square root (Yang et al. 2021, "Delving into Deep Imbalanced
# Regression"), so that the crowded 20s and 30s pull the estimates of rarer ages toward them less;
# "fourth_root_inverse" half as strongly (in log weight), for a milder trade between crowded and rare ages.
AGE_WEIGHTINGS: Registry[Callable[[np.ndarray], np.ndarray]] = Registry(
    "age weighting",
    {
        "none": np.ones_like,
        "sqrt_inverse": lambda density: np.maximum(density, 1.0) ** -0.5,
        "fourth_root_inverse": lambda density: np.maximum(density, 1.0) ** -0.25,
    },
)


def age_loss_weights(ages: np.ndarray, max_age: int, weighting: str) -> np.ndarray:
    """The age loss's weight per year of age 0..max_age for the training faces' `ages` (one entry per face
    as trained, copies included), scaled so that their mean weight is 1: the loss keeps its size."""
    weights = AGE_WEIGHTINGS.create(weighting, smoothed_age_density(ages, max_age))
    return weights / weights[age_years(ages, max_age)].mean()


def read_labels(data: str) -> pd.DataFrame:
    """The crop dataset's label columns (no image bytes) as a DataFrame."""
    fs, path = storage.resolve(data)
    table = pq.read_table(path, filesystem=fs, columns=LABEL_COLUMNS)
    return table.to_pandas()


def plan_dataset(settings: TrainSettings) -> tuple[pd.DataFrame, dict[str, int]]:
    """Per row of the crop dataset to train on: its split and copies for balancing."""
    frame, dropped = usable_rows(read_labels(settings.data))
    frame["age"] = frame["age"].clip(upper=settings.labels.max_age)
    if settings.limit:
        frame = frame.sample(n=min(settings.limit, len(frame)), random_state=settings.seed)
    frame["split"] = stratified_split(
        frame, settings.labels.groups, settings.val_fraction, settings.test_fraction, settings.seed
    ).to_numpy()
    frame["trained"] = frame["split"].isin(training_splits(settings))
    frame["copies"] = 0
    frame.loc[frame["trained"], "copies"] = balancing_weights(
        frame.loc[frame["trained"], "age"], settings.max_per_age, settings.min_per_age, settings.seed
    )
    return frame.reset_index(drop=True), dropped


def training_splits(settings: TrainSettings) -> tuple[str, ...]:
    """The splits whose faces the network trains on; the test split never."""
    return ("train", "val") if settings.train_on_val else ("train",)


FaceKey = tuple[str, int]  # a face in the crop dataset: its image's path and face index (-1: none recorded)


def face_keys(batch: pd.DataFrame) -> list[FaceKey]:
    return list(zip(batch["path"], batch["face_index"].fillna(-1).astype(int), strict=True))


class SplitFilter:
    """Ray Data UDF: keep the rows of one split, repeated by their balancing copies, with the teacher's
    predictions as a `teacher` column when a distilled run has them."""

    def __init__(self, copies: dict[FaceKey, int], teacher: dict[FaceKey, np.ndarray] | None = None) -> None:
        self.copies = copies
        self.teacher = teacher

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        keys = face_keys(batch)
        repeats = np.array([self.copies.get(key, 0) for key in keys], dtype=np.int64)
        kept = batch[["image", "age", "gender"]]
        if self.teacher is not None:
            kept = kept.assign(teacher=[self.teacher.get(key) for key in keys])
        return kept.loc[batch.index.repeat(repeats)].reset_index(drop=True)


def split_dataset(
    settings: TrainSettings,
    plan: pd.DataFrame,
    split: str,
    cpus: float,
    teacher: dict[FaceKey, np.ndarray] | None = None,
) -> Any:
    """The Ray Dataset of one split: for 'train' the faces trained on (`training_splits`) with their
    balancing copies and the `teacher`'s predictions if given, for any other split each of its faces once."""
    import ray.data

    fs, path = storage.resolve(settings.data)
    if split == "train":
        rows = plan[plan["trained"]]
        counts = rows["copies"]
    else:
        rows = plan[plan["split"] == split]
        counts = pd.Series(1, index=rows.index)
    copies = {(p, int(i)): int(c) for p, i, c in zip(rows["path"], rows["face_index"], counts, strict=True) if c}
    dataset = ray.data.read_parquet(
        path,
        filesystem=fs,
        columns=["path", "face_index", "image", "age", "gender"],
        file_extensions=["parquet"],
        num_cpus=cpus,
    )
    split_filter = SplitFilter(copies, teacher if split == "train" else None)
    dataset = dataset.map_batches(split_filter, batch_format="pandas", num_cpus=cpus)
    # Crop datasets are often ordered (by file name, hence by age for UTKFace): without a full
    # shuffle every batch holds one narrow age range and the model chases it.
    return dataset.random_shuffle(num_cpus=cpus) if split == "train" else dataset
