"""Labels from file names or tables, and age groups.

A label source is a function `uri -> Labels`, chosen by name from LABEL_PARSERS
(file-name schemes) or built from a CSV/Parquet table. Parsers never raise on
a bad name: they return missing labels with a `label_note`.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Callable
from typing import TypedDict

import pandas as pd

from agepipe import storage
from agepipe.config import AgeGroups, LabelSettings
from agepipe.registry import Registry

GENDERS = ("male", "female")
RACES = ("White", "Black", "Asian", "Indian", "Others")
CLASS_GROUPS = ("YOUNG", "MIDDLE", "OLD")


class Labels(TypedDict, total=False):
    age: float | None
    gender: str | None
    race: str | None
    age_group: str | None
    label_note: str | None


LABEL_COLUMNS = ("age", "gender", "race", "age_group", "label_note")


def age_group(age: float | None, groups: AgeGroups) -> str | None:
    """Name of the group an age falls in (None for a missing age)."""
    if age is None or age != age:
        return None
    index = bisect.bisect_right(groups.lower_bounds, max(age, 0)) - 1
    return groups.names[index]


def group_index(age: float, groups: AgeGroups) -> int:
    return bisect.bisect_right(groups.lower_bounds, max(age, 0)) - 1


def basename(uri: str) -> str:
    return uri.rstrip("/").rsplit("/", 1)[-1]


_UTKFACE = re.compile(r"^(\d+)_([01])_([0-4])_\d+")
_UTKFACE_NO_RACE = re.compile(r"^(\d+)_([01])_\d{8,}")


def parse_utkface(uri: str) -> Labels:
    """`age_gender_race_date.jpg.chip.jpg`; a few real names miss the race field."""
    name = basename(uri)
    match = _UTKFACE.match(name)
    if match:
        age, gender, race = match.groups()
        return {"age": float(age), "gender": GENDERS[int(gender)], "race": RACES[int(race)]}
    match = _UTKFACE_NO_RACE.match(name)
    if match:
        age, gender = match.groups()
        return {"age": float(age), "gender": GENDERS[int(gender)], "label_note": "no race in name"}
    return {"label_note": f"unparsable UTKFace name: {name}"}


_IMDB = re.compile(r"_(\d{4})-(\d{1,2})-(\d{1,2})_(\d{4})\.[A-Za-z]+$")


def parse_imdb_wiki(uri: str) -> Labels:
    """IMDB-WIKI style `id_YYYY-MM-DD_YEAR.jpg`: age is photo year minus birth year."""
    name = basename(uri)
    match = _IMDB.search(name)
    if not match:
        return {"label_note": f"unparsable IMDB-WIKI name: {name}"}
    birth, taken = int(match.group(1)), int(match.group(4))
    if taken < birth:
        return {"label_note": f"photo year before birth year: {name}"}
    return {"age": float(taken - birth)}


LABEL_PARSERS: Registry[Callable[[str], Labels]] = Registry(
    "labels",
    {"utkface": parse_utkface, "imdb": parse_imdb_wiki, "none": lambda uri: {}},
    alternative="a .csv/.parquet table",
)


def table_labels(table_uri: str, input_root: str) -> Callable[[str], Labels]:
    """Labels from a CSV/Parquet table of `path,age[,gender]` or `ID,Class`.

    Table paths match an image by full URI, by path relative to the input root,
    or by file name, in that order.
    """
    fs, path = storage.resolve(table_uri)
    with fs.open_input_file(path) as f:
        frame = pd.read_parquet(f) if path.endswith(".parquet") else pd.read_csv(f)
    if {"path", "age"} <= set(frame.columns):
        key_column = "path"
    elif {"ID", "Class"} <= set(frame.columns):
        key_column = "ID"
    else:
        raise ValueError(f"label table {table_uri} needs columns path,age[,gender] or ID,Class")
    rows = {str(k): r for k, r in zip(frame[key_column], frame.to_dict("records"), strict=True)}
    root = input_root.rstrip("/") + "/"

    def lookup(uri: str) -> Labels:
        relative = uri[len(root) :] if uri.startswith(root) else uri
        row = rows.get(uri) or rows.get(relative) or rows.get(basename(uri))
        if row is None:
            return {"label_note": "not in label table"}
        if key_column == "ID":
            group = str(row["Class"]).upper()
            if group not in CLASS_GROUPS:
                return {"label_note": f"unknown class {row['Class']!r}"}
            return {"age_group": group}
        labels: Labels = {"age": _number(row.get("age"))}
        if "gender" in row:
            labels["gender"] = _gender(row["gender"])
        return labels

    return lookup


def _number(value: object) -> float | None:
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return None if number != number else number


def _gender(value: object) -> str | None:
    text = str(value).strip().lower()
    mapping = {"0": "male", "m": "male", "male": "male", "1": "female", "f": "female"}
    mapping["female"] = "female"
    return mapping.get(text.removesuffix(".0"))


def label_source(settings: LabelSettings, input_root: str) -> Callable[[str], Labels]:
    """The function that labels an image URI, per `settings.kind`."""
    if settings.kind.lower().endswith((".csv", ".parquet")):
        return table_labels(settings.kind, input_root)
    return LABEL_PARSERS[settings.kind]


def finalize(labels: Labels, settings: LabelSettings) -> Labels:
    """All label columns present; age capped at `max_age`; age group derived from age."""
    out: Labels = {column: labels.get(column) for column in LABEL_COLUMNS}  # type: ignore[misc]
    if out["age"] is not None:
        out["age"] = min(float(out["age"]), settings.max_age)
        out["age_group"] = age_group(out["age"], settings.groups)
    return out
