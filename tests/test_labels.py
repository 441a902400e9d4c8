"""Labels from file names and tables; age groups."""

from __future__ import annotations

import pandas as pd
import pytest

from agepipe.config import AgeGroups, LabelSettings
from agepipe.labels import age_group, finalize, label_source, parse_imdb_wiki, parse_utkface


def test_utkface_names() -> None:
    labels = parse_utkface("s3://b/x/26_1_2_20170116174525125.jpg.chip.jpg")
    assert labels == {"age": 26.0, "gender": "female", "race": "Asian"}


def test_utkface_name_without_race_keeps_age_and_gender() -> None:
    labels = parse_utkface("39_1_20170116174525125.jpg.chip.jpg")
    assert labels["age"] == 39.0 and labels["gender"] == "female"
    assert labels["label_note"]


def test_unparsable_name_is_a_note_not_a_crash() -> None:
    labels = parse_utkface("holiday.jpg")
    assert "age" not in labels and "unparsable" in labels["label_note"]


def test_imdb_wiki_names() -> None:
    assert parse_imdb_wiki("nm0000100_1955-01-06_2011.jpg") == {"age": 56.0}
    assert "label_note" in parse_imdb_wiki("nm0000100_2011.jpg")


def test_default_age_groups() -> None:
    groups = AgeGroups()
    expected = {0: "Child", 12: "Child", 13: "Youth", 25: "Youth", 26: "Adult", 42: "Adult"}
    expected |= {43: "Middle Age", 60: "Middle Age", 61: "Senior", 116: "Senior"}
    assert {age: age_group(age, groups) for age in expected} == expected
    assert age_group(None, groups) is None


def test_configurable_groups_and_age_cap() -> None:
    settings = LabelSettings(max_age=90, groups=AgeGroups((0, 18), ("minor", "adult")))
    out = finalize({"age": 116.0}, settings)
    assert out["age"] == 90 and out["age_group"] == "adult"
    with pytest.raises(ValueError):
        AgeGroups((0, 30, 20), ("a", "b", "c"))


def test_table_of_paths_ages_and_genders(tmp_path) -> None:
    table = tmp_path / "labels.csv"
    pd.DataFrame({"path": ["sub/a.jpg", "b.jpg"], "age": [31, "n/a"], "gender": ["F", 0]}).to_csv(table, index=False)
    lookup = label_source(LabelSettings(kind=str(table)), "/data/in")
    assert lookup("/data/in/sub/a.jpg") == {"age": 31.0, "gender": "female"}
    assert lookup("/data/in/b.jpg") == {"age": None, "gender": "male"}
    assert "not in label table" in lookup("/data/in/c.jpg")["label_note"]


def test_table_of_classes(tmp_path) -> None:
    table = tmp_path / "train.parquet"
    pd.DataFrame({"ID": ["377.jpg", "17814.jpg"], "Class": ["MIDDLE", "YOUNG"]}).to_parquet(table)
    lookup = label_source(LabelSettings(kind=str(table)), "/x")
    assert lookup("/x/377.jpg") == {"age_group": "MIDDLE"}
    assert lookup("/x/17814.jpg") == {"age_group": "YOUNG"}


def test_unknown_label_kind_is_an_error() -> None:
    with pytest.raises(ValueError, match="unknown labels"):
        label_source(LabelSettings(kind="celeba"), "/x")
