"""evaluate: metrics on hand-made frames, the report from real predictions, and the report in Chromium."""

from __future__ import annotations

import io
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from agepipe import evaluate, metrics, plots
from agepipe.cli import main as agepipe_main
from agepipe.config import EvaluateSettings, LabelSettings, ScoreSettings, to_dict
from agepipe.labels import parse_utkface
from agepipe.score import record_score_settings

FACES = 200
GRADCAM_FACES = 4
GALLERY_PHOTOS = 6
LABEL = re.compile(r"^\d+ \((\d+)-(\d+)\), (male|female)$")
PREDICTION_COLUMNS = (
    "face_index",
    "x1",
    "y1",
    "x2",
    "y2",
    "score",
    "num_faces",
    "age",
    "age_low",
    "age_high",
    "age_std",
    "age_group",
    "gender",
    "gender_prob",
    "error",
)


def labeled_faces() -> pd.DataFrame:
    """Four faces; age errors -2, 0, -5, +10 (MAE 4.25, bias 0.75); 3 of 4 groups and genders right."""
    return pd.DataFrame(
        {
            "age": [10.0, 20.0, 30.0, 50.0],
            "label_age": [12.0, 20.0, 35.0, 40.0],
            "age_group": ["Child", "Youth", "Adult", "Middle Age"],
            "label_age_group": ["Child", "Youth", "Adult", "Adult"],
            "gender": ["male", "female", "male", "female"],
            "label_gender": ["male", "male", "male", "female"],
            "label_race": ["White", "Black", "White", "Asian"],
        }
    )


def is_png(data: bytes) -> bool:
    image = Image.open(io.BytesIO(data))
    return image.format == "PNG" and min(image.size) > 100


# --- pure metrics on hand-made frames ---


def test_age_errors_by_hand() -> None:
    errors = metrics.age_errors(labeled_faces())
    assert errors["faces"] == 4
    assert errors["mae"] == pytest.approx(4.25)
    assert errors["bias"] == pytest.approx(0.75)
    assert errors["rmse"] == pytest.approx(np.sqrt((4 + 0 + 25 + 100) / 4))
    assert errors["median_ae"] == pytest.approx(3.5)
    assert errors["within_5"] == pytest.approx(0.75)


def test_mae_by_group_is_ordered_youngest_first_with_counts() -> None:
    by_group = metrics.mae_by(labeled_faces(), "label_age_group")
    assert list(by_group["group"]) == ["Child", "Youth", "Adult"]
    assert list(by_group["faces"]) == [1, 1, 2]
    assert list(by_group["mae"]) == pytest.approx([2.0, 0.0, 7.5])
    assert list(by_group["bias"]) == pytest.approx([-2.0, 0.0, 2.5])
    by_gender = metrics.mae_by(labeled_faces(), "label_gender")
    assert list(by_gender["group"]) == ["female", "male"]
    assert list(by_gender["mae"]) == pytest.approx([10.0, 7 / 3])
    by_race = metrics.mae_by(labeled_faces(), "label_race")
    assert dict(zip(by_race["group"], by_race["mae"], strict=True)) == {
        "Asian": 10.0,
        "Black": 0.0,
        "White": 3.5,
    }


def test_mae_by_a_missing_column_is_empty() -> None:
    assert metrics.mae_by(labeled_faces().drop(columns="label_race"), "label_race").empty


def test_age_group_confusion_counts_actual_rows_against_predicted_columns() -> None:
    confusion = metrics.age_group_confusion(labeled_faces())
    names = ["Child", "Youth", "Adult", "Middle Age"]
    assert list(confusion.index) == names and list(confusion.columns) == names
    expected = [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 1], [0, 0, 0, 0]]
    assert confusion.to_numpy().tolist() == expected


def test_gender_report_by_hand() -> None:
    report = metrics.gender_report(labeled_faces())
    assert report["male"]["precision"] == pytest.approx(1.0)
    assert report["male"]["recall"] == pytest.approx(2 / 3)
    assert report["female"]["precision"] == pytest.approx(0.5)
    assert report["female"]["recall"] == pytest.approx(1.0)
    assert report["female"]["support"] == 1
    assert report["accuracy"] == pytest.approx(0.75)


def test_metrics_summary_is_json_ready_and_skips_what_is_not_labeled() -> None:
    summary = metrics.metrics_summary(labeled_faces())
    assert json.loads(json.dumps(summary)) == summary
    assert summary["faces"] == 4 and summary["age"]["mae"] == pytest.approx(4.25)
    assert summary["age_group"]["accuracy"] == pytest.approx(0.75)
    assert summary["by_race"][0] == {"group": "Asian", "faces": 1, "mae": 10.0, "bias": 10.0}
    frame = labeled_faces().drop(columns="label_race")
    frame.loc[3, "label_age"] = np.nan
    partial = metrics.metrics_summary(frame)
    assert partial["by_race"] == []
    assert partial["age"]["faces"] == 3 and partial["age"]["mae"] == pytest.approx(7 / 3)
    assert partial["age_group"]["faces"] == 4


def test_coverage_counts_images_faces_and_errors() -> None:
    predictions = pd.DataFrame(
        {
            "path": ["a.jpg", "a.jpg", "b.jpg", "c.jpg", "d.jpg"],
            "face_index": [0, 1, None, None, 0],
            "error": [None, None, "no_face", "corrupt", None],
        }
    )
    assert metrics.coverage(predictions) == {
        "images": 4,
        "images_with_faces": 2,
        "faces": 3,
        "no_face": 1,
        "errors": 1,
        "error_reasons": {"corrupt": 1},
    }
    assert list(metrics.scored_faces(predictions)["path"]) == ["a.jpg", "a.jpg", "d.jpg"]


def test_labels_from_paths_are_capped_and_grouped() -> None:
    predictions = pd.DataFrame(
        {"path": ["/p/110_0_0_20170112213500903.jpg.chip.jpg", "/p/9_1_2_20170112213500903.jpg", "/p/x.jpg"]}
    )
    labeled = evaluate.with_labels(predictions, LabelSettings(kind="utkface"))
    assert list(labeled["label_age"][:2]) == [100.0, 9.0] and np.isnan(labeled["label_age"][2])
    assert list(labeled["label_gender"][:2]) == ["male", "female"]
    assert list(labeled["label_race"][:2]) == ["White", "Asian"]
    assert list(labeled["label_age_group"][:2]) == ["Senior", "Child"] and pd.isna(labeled["label_age_group"][2])


def test_age_groups_are_completed_from_scoring_label_ages() -> None:
    predictions = pd.DataFrame({"path": ["a", "b"], "label_age": [30.0, 70.0]})
    labeled = evaluate.with_labels(predictions, LabelSettings())
    assert list(labeled["label_age_group"]) == ["Adult", "Senior"]


def test_common_root_is_the_deepest_shared_folder() -> None:
    assert evaluate.common_root(["s3://b/x/a.jpg", "s3://b/x/y/c.jpg"]) == "s3://b/x"
    assert evaluate.common_root(["/d/one/a.jpg", "/d/two/b.jpg"]) == "/d"
    assert evaluate.common_root(["/d/ab/a.jpg", "/d/abc/b.jpg"]) == "/d"


def test_read_predictions_unifies_files_and_skips_bookkeeping(tmp_path) -> None:
    pq.write_table(pa.table({"path": ["a"], "face_index": [0], "label_age": pa.nulls(1)}), tmp_path / "1.parquet")
    pq.write_table(pa.table({"path": ["b"], "face_index": [0], "label_age": [30.0]}), tmp_path / "2.parquet")
    (tmp_path / "_staging").mkdir()
    (tmp_path / "_staging" / "3.parquet").write_bytes(b"half-written")
    frame = evaluate.read_predictions(str(tmp_path))
    assert list(frame["path"]) == ["a", "b"]
    assert frame["label_age"].isna().tolist() == [True, False]
    with pytest.raises(FileNotFoundError):
        evaluate.read_predictions(str(tmp_path / "missing"))


def test_sample_faces_spreads_over_the_age_range() -> None:
    faces = pd.DataFrame({"age": np.arange(100.0)[::-1], "label_age": np.arange(100.0)})
    sample = metrics.sample_faces(faces, 4, seed=1)
    assert [int(age // 25) for age in sample["label_age"]] == [0, 1, 2, 3]
    assert sample.equals(metrics.sample_faces(faces, 4, seed=1))
    assert len(metrics.sample_faces(faces.head(2), 4, seed=1)) == 2


def test_training_summary_finds_the_best_epoch() -> None:
    run = pd.DataFrame({"epoch": [0, 1, 2], "phase": [1, 2, 2], "val_mae": [9.0, 6.5, 7.0]})
    assert metrics.training_summary(run) == {"epochs": 3, "best_epoch": 1, "best_val_mae": 6.5}


def test_plots_are_pngs() -> None:
    faces = labeled_faces()
    tables = {name: metrics.mae_by(faces, column) for name, column in metrics.GROUPINGS.items()}
    run = pd.DataFrame({"epoch": [0, 1], "phase": [1, 2], "train_loss": [2.0, 1.0], "val_mae": [9.0, 6.5]})
    tile = plots.GradcamTile(np.zeros((64, 64, 3), np.uint8), np.full((64, 64, 3), 255, np.uint8), "x")
    for png in (
        plots.plot_predicted_vs_actual(faces),
        plots.plot_error_histogram(faces),
        plots.plot_age_distribution(faces),
        plots.plot_confusion_matrix(metrics.age_group_confusion(faces)),
        plots.plot_mae_by_group(tables),
        plots.plot_training_curves(run),
        plots.plot_gradcam_grid([tile] * 5),
    ):
        assert is_png(png)


def test_gallery_draws_each_face_with_its_interval_and_orders_photos_widest_first() -> None:
    assert plots.face_label(31.2, 24.6, 38.4, "female") == "31 (25-38), female"
    assert plots.face_label(31.2, None, None, "male") == "31, male"  # a model without calibration
    faces = pd.DataFrame(
        {
            "path": ["a.jpg", "b.jpg", "b.jpg", "c.jpg"],
            "age": [30.0, 8.0, 70.0, 40.0],
            "age_low": [25.0, 6.0, 55.0, 30.0],
            "age_high": [36.0, 11.0, 90.0, 52.0],
        }
    )
    assert plots.widest_first(faces) == ["b.jpg", "c.jpg", "a.jpg"]
    image = np.full((400, 600, 3), 128, np.uint8)
    face = pd.DataFrame({"x1": [300.0], "y1": [100.0], "x2": [500.0], "y2": [300.0], "age": [31.0]})
    face = face.assign(age_low=25.0, age_high=38.0, gender="female")
    jpeg, labels = plots.draw_faces(image, face, side=300)
    drawn = np.asarray(Image.open(io.BytesIO(jpeg)))
    assert drawn.shape == (200, 300, 3) and labels == ["31 (25-38), female"]
    # The box's left edge, at half scale, is drawn in the box colour; the photo elsewhere is untouched.
    assert drawn[100, 150, 1] > 180 and drawn[100, 150, 0] < 80
    assert abs(int(drawn[190, 20, 0]) - 128) < 8
    # The label's dark band sits just above the box.
    assert drawn[45, 160].max() < 60
    # A face that fills the photo (an aligned face image) has its label inside the top of its box.
    whole = face.assign(x1=0.0, y1=0.0, x2=600.0, y2=400.0)
    drawn = np.asarray(Image.open(io.BytesIO(plots.draw_faces(image, whole, side=300)[0])))
    assert drawn[6, 8].max() < 60 and abs(int(drawn[100, 150, 0]) - 128) < 8


# --- the report from real predictions ---


def write_predictions(rows: list[dict], folder: Path, files: int = 2) -> str:
    """A Parquet dataset of prediction rows, as the scoring job writes (several files)."""
    folder.mkdir(parents=True)
    table = pa.Table.from_pylist(rows)
    size = -(-len(rows) // files)
    for index in range(files):
        pq.write_table(table.slice(index * size, size), folder / f"part-{index}.parquet")
    return str(folder)


@pytest.fixture(scope="module")
def scored(utkface_dir, model_path, tmp_path_factory) -> dict:
    """Real predictions over FACES UTKFace faces, an unreadable file and a photo without a face."""
    from agepipe.predict import Predictor
    from agepipe.score import cropped_rows, score_rows

    root = tmp_path_factory.mktemp("evaluate")
    names = sorted(p.name for p in utkface_dir.glob("*.jpg"))
    paths = [str(utkface_dir / name) for name in names[:: len(names) // FACES][:FACES]]
    broken = root / "broken.jpg"
    broken.write_bytes(b"not an image")
    paths.append(str(broken))
    predictor = Predictor(model_path, {"detector": "none"}, flip_tta=False)
    rows = []
    for start in range(0, len(paths), 50):
        scored = score_rows(cropped_rows({"path": paths[start : start + 50]}, predictor), predictor)
        rows += [{c: row.get(c) for c in ["path", *PREDICTION_COLUMNS]} for row in scored]
    no_face = {c: None for c in PREDICTION_COLUMNS} | {"num_faces": 0, "error": "no_face"}
    rows.append({"path": str(root / "landscape.jpg"), **no_face})
    run = root / "run"
    run.mkdir()
    pd.DataFrame(
        {
            "epoch": [0, 1, 2, 3],
            "phase": [1, 1, 2, 2],
            "train_loss": [5.0, 4.0, 3.0, 2.5],
            "val_loss": [5.5, 4.5, 3.8, 3.9],
            "train_mae": [12.0, 9.0, 7.0, 6.0],
            "val_mae": [12.5, 9.5, 7.5, 7.8],
            "val_group_accuracy": [0.4, 0.5, 0.6, 0.59],
            "val_gender_accuracy": [0.7, 0.8, 0.85, 0.86],
        }
    ).to_csv(run / "metrics.csv", index=False)
    broken_error = next(row["error"] for row in rows if row["path"] == str(broken))
    return {
        "root": root,
        "rows": rows,
        "run": str(run),
        "broken_error": broken_error,
        "model": model_path,
        "predictor": predictor,
    }


def expected_mae(rows: list[dict]) -> float:
    """MAE computed here, independently: file-name ages capped at 100."""
    faces = [row for row in rows if row["error"] is None]
    return float(np.mean([abs(row["age"] - min(parse_utkface(row["path"])["age"], 100)) for row in faces]))


@pytest.fixture(scope="module")
def evaluated(scored) -> dict:
    predictions = write_predictions(scored["rows"], scored["root"] / "predictions")
    settings = EvaluateSettings(
        predictions=predictions,
        output=str(scored["root"] / "report"),
        labels=LabelSettings(kind="utkface"),
        run=scored["run"],
        model=scored["model"],
        crop_overrides={"detector": "none"},
        gradcam_faces=GRADCAM_FACES,
        gallery_photos=GALLERY_PHOTOS,
    )
    return evaluate.run_evaluate(settings)


def test_report_files_and_metrics_from_real_predictions(scored, evaluated) -> None:
    output = Path(evaluated["report"]).parent
    expected_plots = {
        "predicted_vs_actual",
        "error_histogram",
        "mae_by_group",
        "age_group_confusion",
        "age_distribution",
        "gradcam",
        "training_curves",
    }
    assert set(evaluated["plots"]) == {f"{name}.png" for name in expected_plots}
    for name in evaluated["plots"]:
        assert is_png((output / name).read_bytes()), name
    written = json.loads((output / "metrics.json").read_text())
    assert written == {k: v for k, v in evaluated.items() if k != "report"}
    assert written["coverage"] == {
        "images": FACES + 2,
        "images_with_faces": FACES,
        "faces": FACES,
        "no_face": 1,
        "errors": 1,
        "error_reasons": {scored["broken_error"]: 1},
    }
    metrics = written["metrics"]
    assert metrics["age"]["faces"] == FACES
    assert metrics["age"]["mae"] == pytest.approx(expected_mae(scored["rows"]), rel=1e-5)
    assert sum(row["faces"] for row in metrics["by_gender"]) == FACES
    # Each race's faces and MAE, counted here from the file names (a few names carry no race).
    races = [(parse_utkface(row["path"]).get("race"), row) for row in scored["rows"] if row["error"] is None]
    by_race = {row["group"]: row for row in metrics["by_race"]}
    assert {group: row["faces"] for group, row in by_race.items()} == dict(Counter(r for r, _ in races if r))
    for group, row in by_race.items():
        assert row["mae"] == pytest.approx(expected_mae([face for r, face in races if r == group]), rel=1e-5)
    groups = [row["group"] for row in metrics["by_age_group"]]
    assert groups == [g for g in ("Child", "Youth", "Adult", "Middle Age", "Senior") if g in groups]
    assert sum(map(sum, metrics["age_group"]["confusion"])) == FACES
    assert set(metrics["gender"]) >= {"male", "female", "accuracy"}
    assert written["gradcam_faces"] == GRADCAM_FACES
    assert written["training"] == {
        "epochs": 4,
        "best_epoch": 2,
        "best_val_mae": 7.5,
        "best_val_group_accuracy": 0.6,
        "best_val_gender_accuracy": 0.85,
    }
    intervals = metrics["interval"]
    assert intervals["overall"]["faces"] == FACES and 0.8 <= intervals["overall"]["coverage"] <= 1
    assert sum(row["faces"] for row in intervals["by_gender"]) == FACES
    assert [row["group"] for row in intervals["by_age_group"]] == groups
    faces = [row for row in scored["rows"] if row["error"] is None]
    widths = sorted((row["age_high"] - row["age_low"] for row in faces), reverse=True)
    assert len(written["gallery"]) == GALLERY_PHOTOS
    for photo, width in zip(written["gallery"], widths, strict=False):  # one face a photo: widest first
        [label] = photo["faces"]
        low, high = map(int, LABEL.match(label).groups()[:2])
        assert abs((high - low) - width) <= 1
    report = (output / "report.html").read_text()
    assert report.count('src="data:image/png;base64,') == len(expected_plots)
    assert report.count('src="data:image/jpeg;base64,') == GALLERY_PHOTOS
    assert 'id="mae-overall"' in report and 'src="http' not in report


def test_cli_uses_the_scoring_jobs_label_columns(scored, evaluated, tmp_path) -> None:
    rows = []
    for row in scored["rows"]:
        labels = parse_utkface(row["path"])
        label_age = min(labels["age"], 100) if "age" in labels else None
        rows.append(row | {"label_age": label_age, "label_gender": labels.get("gender")})
    predictions = write_predictions(rows, tmp_path / "predictions", files=3)
    output = tmp_path / "report"
    status = agepipe_main(["evaluate", "--predictions", predictions, "--output", str(output), "--gradcam-faces", "0"])
    assert status == 0
    written = json.loads((output / "metrics.json").read_text())
    assert written["metrics"]["age"]["mae"] == pytest.approx(evaluated["metrics"]["age"]["mae"], rel=1e-5)
    assert written["metrics"]["by_race"] == []
    assert written["gradcam_faces"] == 0 and "gradcam.png" not in written["plots"]
    assert not (output / "gradcam.png").exists() and (output / "report.html").is_file()


def test_cli_fails_cleanly_without_predictions(tmp_path, capsys) -> None:
    status = agepipe_main(["evaluate", "--predictions", str(tmp_path / "none"), "--output", str(tmp_path / "r")])
    assert status == 2 and "do not exist" in capsys.readouterr().err


def test_s3_predictions_in_and_report_out(scored, evaluated, s3_server) -> None:
    import boto3

    client = boto3.client("s3", endpoint_url=s3_server["AWS_ENDPOINT_URL"])
    client.create_bucket(Bucket="scores")
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(scored["rows"]), buffer)
    client.put_object(Bucket="scores", Key="run1/part-0.parquet", Body=buffer.getvalue())
    settings = EvaluateSettings(
        predictions="s3://scores/run1/",
        output="s3://scores/report/",
        labels=LabelSettings(kind="utkface"),
        gradcam_faces=0,
    )
    result = evaluate.run_evaluate(settings)
    assert result["report"] == "s3://scores/report/report.html"
    keys = {o["Key"] for o in client.list_objects_v2(Bucket="scores", Prefix="report/")["Contents"]}
    assert keys == {"report/report.html", "report/metrics.json", *(f"report/{p}" for p in result["plots"])}
    written = json.loads(client.get_object(Bucket="scores", Key="report/metrics.json")["Body"].read())
    assert written["metrics"]["age"]["mae"] == pytest.approx(evaluated["metrics"]["age"]["mae"], rel=1e-5)


def test_the_score_runs_recorded_settings_are_read_back_or_nothing_is_known(scored, tmp_path) -> None:
    settings = ScoreSettings(input=str(tmp_path / "images"), output=str(tmp_path / "scores"))
    record_score_settings(settings, scored["predictor"])
    recorded = evaluate.read_score_run(settings.output)
    assert recorded.model == str(Path(scored["model"]).resolve())
    assert recorded.crop == to_dict(scored["predictor"].crop) and recorded.crop["detector"] == "none"
    assert recorded.input == settings.input
    single = tmp_path / "one.parquet"
    pq.write_table(pa.table({"path": ["a"]}), single)
    for unrecorded in (tmp_path / "elsewhere", single):
        assert evaluate.read_score_run(str(unrecorded)) == evaluate.ScoreRun(model=None, crop={}, input=None)


def test_label_tables_are_anchored_at_the_score_runs_input(scored, tmp_path) -> None:
    # Every image is in one subfolder of the input, so the images' deepest common folder is that
    # subfolder, and a table of paths relative to the input matches only where score anchored it.
    images = tmp_path / "images"
    faces = [row for row in scored["rows"] if row["error"] is None][:10]
    rows = [row | {"path": str(images / "sub" / Path(row["path"]).name)} for row in faces]
    table = tmp_path / "labels.csv"
    pd.DataFrame({"path": [f"sub/{Path(row['path']).name}" for row in rows], "age": 30}).to_csv(table, index=False)
    labels = LabelSettings(kind=str(table))
    predictions = write_predictions(rows, tmp_path / "predictions")
    record_score_settings(ScoreSettings(input=str(images), output=predictions, labels=labels), scored["predictor"])
    settings = EvaluateSettings(
        predictions=predictions, output=str(tmp_path / "report"), labels=labels, gradcam_faces=0
    )
    result = evaluate.run_evaluate(settings)
    assert result["metrics"]["age"]["faces"] == len(rows)
    assert result["model"] == str(Path(scored["model"]).resolve())
    (tmp_path / "predictions" / "_agepipe_score.json").unlink()
    unanchored = evaluate.run_evaluate(settings)
    assert unanchored["metrics"] is None and unanchored["model"] == "default"


# --- the report in a browser ---


def test_report_renders_in_headless_chromium(evaluated, browser_page) -> None:
    browser_page.goto(Path(evaluated["report"]).as_uri())
    images = browser_page.evaluate(
        "() => [...document.querySelectorAll('img.plot')].map(i => [i.alt, i.complete, i.naturalWidth])"
    )
    mae_table = browser_page.inner_text("#mae-overall")
    assert sorted(alt for alt, _, _ in images) == sorted(name.removesuffix(".png") for name in evaluated["plots"])
    assert all(complete and width > 0 for _, complete, width in images), images
    assert f"{evaluated['metrics']['age']['mae']:.2f}" in mae_table
    coverage = evaluated["metrics"]["interval"]["overall"]["coverage"]
    assert f"{coverage:.2f}" in browser_page.inner_text("#interval-overall")
    assert "actual age lies inside their interval" in browser_page.inner_text("#intervals")
    photos = browser_page.evaluate(
        "() => [...document.querySelectorAll('#gallery figure')].map(f => [Number(f.dataset.widest), "
        "f.querySelector('img').naturalWidth, f.querySelector('figcaption').innerText])"
    )
    assert len(photos) == GALLERY_PHOTOS and all(width > 0 for _, width, _ in photos)
    widest = [value for value, _, _ in photos]
    assert widest == sorted(widest, reverse=True) and widest[-1] > 0
    assert all(LABEL.match(caption.split(": ", 1)[1]) for _, _, caption in photos)
