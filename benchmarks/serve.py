"""Serve endpoint benchmark: latency p50/p99 and throughput at 1, 8 and 32 concurrent clients, with and
without request batching, for 200x200 UTKFace faces (`--detector none`) and 640x480 scenes (YuNet).

    .venv/bin/python benchmarks/serve.py [--model NAME|PATH] [--seconds 6] [--results serve]

Each client is an asyncio task that posts its next image as soon as the previous answer arrives.
One replica (one CPU) on a local Ray; the clients run on the same machine. Writes
benchmarks/results/serve.md and serve.json (`--results` names them otherwise). The model is `agepipe
serve`'s default (the bundled `fast`) unless `--model` names another.

    .venv/bin/python benchmarks/serve.py --soak [--minutes 10] [--clients 32] [--results serve-soak]

The soak: `agepipe serve` as shipped (its checkpoint's YuNet detector, every face) with two model
replicas, `--clients` clients for `--minutes`, each request drawn from a seeded mix of UTKFace faces,
12-megapixel photos of several faces and bad bodies (text, truncated JPEGs, empty). It reports
requests/s, p50 and p99 per kind, every status code, and the memory (RSS) of every Serve process at
the start, minute 2, the middle and the end, sampled every 5 s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import threading
import time
from collections import Counter

import aiohttp
import numpy as np
import psutil
import ray
from PIL import Image

from agepipe.config import ServeSettings
from agepipe.images import encode
from agepipe.result_tables import RESULTS_DIR, markdown_table
from agepipe.scenes import compose_scene
from agepipe.serve import apply_ray_serve_env, start_server, stop_server
from agepipe.shared_data import UTKFACE, YUNET

CLIENT_COUNTS = (1, 8, 32)
BATCH_SIZES = {"on": 16, "off": 1}


def face_images(count: int) -> list[bytes]:
    paths = sorted(UTKFACE.glob("*.jpg"))[:count]
    if not paths:
        raise SystemExit(f"no UTKFace images under {UTKFACE}: set AGEPIPE_SHARED")
    return [path.read_bytes() for path in paths]


def scene_images(count: int, faces_per_scene: int = 2) -> list[bytes]:
    """640x480 JPEG scenes of UTKFace faces pasted onto a textured, noisy background."""
    rng = np.random.default_rng(0)
    paths = sorted(UTKFACE.glob("*.jpg"))[: count * faces_per_scene]
    scenes = []
    for start in range(0, len(paths), faces_per_scene):
        faces = [np.asarray(Image.open(p).convert("RGB")) for p in paths[start : start + faces_per_scene]]
        pixels, _ = compose_scene(faces, (480, 640), rng, min_side=90)
        scenes.append(encode(pixels, "jpeg", 90))
    return scenes


async def run_clients(url: str, images: list[bytes], clients: int, seconds: float) -> dict:
    """Closed-loop load: `clients` tasks posting images back to back for `seconds`."""
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    faces = 0
    deadline = time.perf_counter() + seconds

    async def client(index: int, session: aiohttp.ClientSession) -> None:
        nonlocal faces
        sent = 0
        while time.perf_counter() < deadline:
            data = images[(index * 7 + sent) % len(images)]
            sent += 1
            start = time.perf_counter()
            async with session.post(url, data=data, headers={"Content-Type": "image/jpeg"}) as response:
                body = await response.json()
            latencies.append(time.perf_counter() - start)
            statuses[response.status] = statuses.get(response.status, 0) + 1
            if response.status == 200:
                faces += len(body["faces"])

    connector = aiohttp.TCPConnector(limit=clients)
    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        started = time.perf_counter()
        await asyncio.gather(*(client(i, session) for i in range(clients)))
        elapsed = time.perf_counter() - started
    milliseconds = np.array(latencies) * 1000
    return {
        "clients": clients,
        "requests": len(latencies),
        "p50_ms": round(float(np.percentile(milliseconds, 50)), 1),
        "p99_ms": round(float(np.percentile(milliseconds, 99)), 1),
        "requests_per_s": round(len(latencies) / elapsed, 1),
        "faces_per_s": round(faces / elapsed, 1),
        "non_200": sum(count for status, count in statuses.items() if status != 200),
    }


def one_replica(model: str, port: int, crop_overrides: dict, **options: object) -> ServeSettings:
    """The benchmark's Serve settings: one replica, every face, `options` over the defaults."""
    return ServeSettings(
        port=port,
        model=model,
        crop_overrides={**crop_overrides, "all_faces": True},
        min_replicas=1,
        max_replicas=1,
        **options,
    )


def start_warm(settings: ServeSettings, images: list[bytes]) -> str:
    """Start the app and send it a short warm-up load; returns the /predict URL."""
    url = start_server(settings, name="benchmark") + "predict"
    asyncio.run(run_clients(url, images, clients=4, seconds=2))
    return url


def benchmark(model: str, seconds: float, port: int) -> list[dict]:
    workloads = {
        "faces 200x200 (--detector none)": (face_images(64), {"detector": "none"}),
        "scenes 640x480, 2 faces (YuNet)": (
            scene_images(16),
            {"detector": "yunet", "detector_weights": YUNET},
        ),
    }
    rows = []
    for workload, (images, detector) in workloads.items():
        for batching, batch_size in BATCH_SIZES.items():
            url = start_warm(one_replica(model, port, detector, batch_size=batch_size), images)
            for clients in CLIENT_COUNTS:
                result = asyncio.run(run_clients(url, images, clients, seconds))
                rows.append({"workload": workload, "batching": batching, **result})
                print(json.dumps(rows[-1]), flush=True)
    return rows


def ablation(model: str, seconds: float, port: int) -> list[dict]:
    """Faces at 32 clients, side by side: Ray Serve's defaults against its throughput mode (each in a
    fresh local Ray, since Serve's processes read the mode at start), flip TTA on and off."""
    images = face_images(64)
    rows = []
    for mode in ("Ray Serve defaults", "throughput mode"):
        for name in ServeSettings().ray_serve_env:
            os.environ.pop(name, None)
        if mode == "throughput mode":
            apply_ray_serve_env(ServeSettings().ray_serve_env)
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            for flip_tta in (True, False):
                url = start_warm(one_replica(model, port, {"detector": "none"}, flip_tta=flip_tta), images)
                result = asyncio.run(run_clients(url, images, 32, seconds))
                rows.append({"serve": mode, "flip TTA": "on" if flip_tta else "off", **result})
                print(json.dumps(rows[-1]), flush=True)
                stop_server()
        finally:
            ray.shutdown()
    return rows


def ablation_table(rows: list[dict]) -> str:
    keys = {"serve": "serve", "flip TTA": "flip TTA", "p50_ms": "p50 ms", "p99_ms": "p99 ms",
            "faces_per_s": "faces/s", "non_200": "non-200"}  # fmt: skip
    return markdown_table([{name: r[key] for key, name in keys.items()} for r in rows], float_format="")


def serving_table(rows: list[dict]) -> str:
    keys = {"workload": "workload", "batching": "batching", "clients": "clients", "requests": "requests",
            "p50_ms": "p50 ms", "p99_ms": "p99 ms", "requests_per_s": "requests/s", "faces_per_s": "faces/s",
            "non_200": "non-200"}  # fmt: skip
    return markdown_table([{name: r[key] for key, name in keys.items()} for r in rows], float_format="")


# The soak's request mix: kind -> share of requests.
SOAK_MIX = {"face": 0.7, "photo_12mp": 0.1, "bad_body": 0.2}
SOAK_APP = "soak"
MEMORY_EVERY_S = 5.0


def photos_12mp(count: int) -> list[bytes]:
    """4032x3024 JPEGs (q90) of three UTKFace faces each, as a phone takes them."""
    rng = np.random.default_rng(1)
    paths = sorted(UTKFACE.glob("*.jpg"))[1000 : 1000 + 3 * count]
    photos = []
    for start in range(0, len(paths), 3):
        faces = [np.asarray(Image.open(p).convert("RGB")) for p in paths[start : start + 3]]
        pixels, _ = compose_scene(faces, (3024, 4032), rng, min_side=300)
        photos.append(encode(pixels, "jpeg", 90))
    return photos


def bad_bodies(face: bytes) -> list[bytes]:
    return [b"this is not an image" * 20, face[: len(face) // 2], b""]


def serve_processes() -> dict[str, list[psutil.Process]]:
    """This soak's Serve processes by role: its deployments' replicas, and the HTTP proxy and controller
    of the same Ray (workers of one raylet; other Rays on the machine have their own)."""
    roles: dict[str, list[psutil.Process]] = {}
    others: list[tuple[str, psutil.Process]] = []
    for process in psutil.process_iter(["cmdline", "ppid"]):
        title = (process.info["cmdline"] or [""])[0]
        if title.startswith(f"ray::ServeReplica:{SOAK_APP}:"):
            role = title.removeprefix(f"ray::ServeReplica:{SOAK_APP}:").split(".")[0]
            roles.setdefault(role, []).append(process)
        elif title.startswith(("ray::ProxyActor", "ray::ServeController")):
            others.append((title.removeprefix("ray::").split(".")[0], process))
    raylets = {p.info["ppid"] for processes in roles.values() for p in processes}
    for role, process in others:
        if process.info["ppid"] in raylets:
            roles.setdefault(role, []).append(process)
    return roles


def memory_mb() -> dict[str, float]:
    """Resident memory of each role's processes together, in MB."""
    usage = {}
    for role, processes in serve_processes().items():
        total = 0
        for process in processes:
            try:
                total += process.memory_info().rss
            except psutil.NoSuchProcess:
                continue
        usage[role] = round(total / 1e6, 1)
    return usage


def sample_memory(samples: list[dict], started: float, stop: threading.Event) -> None:
    while not stop.is_set():
        samples.append({"t_s": round(time.perf_counter() - started, 1), **memory_mb()})
        stop.wait(MEMORY_EVERY_S)


async def soak_clients(url: str, bodies: dict[str, list[bytes]], clients: int, seconds: float) -> list[tuple]:
    """Closed-loop load from a seeded mix; one (kind, status, seconds, sent at) per request."""
    results: list[tuple] = []
    kinds, weights = list(SOAK_MIX), list(SOAK_MIX.values())
    deadline = time.perf_counter() + seconds

    async def client(index: int, session: aiohttp.ClientSession) -> None:
        rng = random.Random(index)
        while time.perf_counter() < deadline:
            kind = rng.choices(kinds, weights)[0]
            data = rng.choice(bodies[kind])
            start = time.perf_counter()
            try:
                async with session.post(url, data=data, headers={"Content-Type": "image/jpeg"}) as response:
                    await response.read()
                    status: int | str = response.status
            except aiohttp.ClientError as exc:
                status = type(exc).__name__
            results.append((kind, status, time.perf_counter() - start, start))

    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=300)) as session:
        await asyncio.gather(*(client(i, session) for i in range(clients)))
    return results


def latency_row(name: str, results: list[tuple], seconds: float) -> dict:
    milliseconds = np.array([r[2] for r in results]) * 1000
    return {
        "requests": name,
        "count": len(results),
        "requests_per_s": round(len(results) / seconds, 2),
        "p50_ms": round(float(np.percentile(milliseconds, 50)), 1),
        "p99_ms": round(float(np.percentile(milliseconds, 99)), 1),
    }


def at_minute(samples: list[dict], minute: float) -> dict:
    """The memory sample nearest `minute` into the soak."""
    return min(samples, key=lambda s: abs(s["t_s"] - minute * 60))


def soak(args: argparse.Namespace) -> None:
    faces = face_images(200)
    bodies = {"face": faces, "photo_12mp": photos_12mp(6), "bad_body": bad_bodies(faces[0])}
    settings = ServeSettings(
        port=args.port,
        model=args.model,
        min_replicas=2,
        max_replicas=2,
        num_cpus=1,
        crop_overrides={"all_faces": True, "detector_weights": YUNET},
    )
    load_before = os.getloadavg()
    apply_ray_serve_env(settings.ray_serve_env)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    samples: list[dict] = []
    stop = threading.Event()
    try:
        url = start_server(settings, name=SOAK_APP) + "predict"
        asyncio.run(soak_clients(url, bodies, clients=4, seconds=10))  # warm-up
        seconds = args.minutes * 60
        started = time.perf_counter()
        sampler = threading.Thread(target=sample_memory, args=(samples, started, stop))
        sampler.start()
        results = asyncio.run(soak_clients(url, bodies, args.clients, seconds))
        elapsed = time.perf_counter() - started
        stop.set()
        sampler.join()
    finally:
        stop_server()
        ray.shutdown()
    statuses = Counter(f"{kind} {status}" for kind, status, _, _ in results)
    rows = [latency_row("all", results, elapsed)] + [
        latency_row(kind, [r for r in results if r[0] == kind], elapsed) for kind in SOAK_MIX
    ]
    # Minute 2 to minute 10 is the target's window; a longer soak also shows whether growth levels off.
    marks = {"start": 0.0, "minute 2": 2.0, "minute 10": 10.0, "middle": args.minutes / 2, "end": args.minutes}
    marks = dict(sorted(((k, v) for k, v in marks.items() if v <= args.minutes), key=lambda item: item[1]))
    if args.minutes <= 10:
        marks.pop("minute 10", None)  # the end itself, or past it
    memory = {mark: at_minute(samples, minute) for mark, minute in marks.items()}
    windows = {"minute 2 to the end": "end", "minute 2 to minute 10": "minute 10"}
    growth = {
        window: {
            role: round(100 * (memory[last][role] / memory["minute 2"][role] - 1), 1)
            for role in memory[last]
            if role != "t_s" and memory["minute 2"].get(role)
        }
        for window, last in windows.items()
        if last in memory
    }
    server_errors = sum(count for key, count in statuses.items() if key.split()[-1].startswith("5"))
    summary = {
        "minutes": args.minutes,
        "clients": args.clients,
        "mix": SOAK_MIX,
        "model": args.model or "default",
        "replicas": settings.min_replicas,
        "replica_cpus": settings.num_cpus,
        "cpus": os.cpu_count(),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "server_errors": server_errors,
        "memory_growth_percent": growth,
    }
    memory_rows = [{"when": mark, **sample} for mark, sample in memory.items()]
    text = (
        f"`benchmarks/serve.py --soak --minutes {args.minutes} --clients {args.clients}`: two model replicas "
        f"(one CPU each) and the HTTP ingress on local Ray, {summary['cpus']} CPUs shared with the clients; "
        f"model {summary['model']} with its checkpoint's YuNet, every face. Mix: {SOAK_MIX}. Load average "
        f"before/after: {summary['load_average_before']} / {summary['load_average_after']}.\n\n"
        f"{markdown_table(rows, float_format='')}\n\nStatus codes: "
        f"{', '.join(f'{key}: {count}' for key, count in sorted(statuses.items()))}; 5xx: {server_errors}.\n\n"
        f"Resident memory (MB) of the Serve processes, each role's processes together:\n\n"
        f"{markdown_table(memory_rows, float_format='')}\n\n"
        + "".join(
            f"Growth from {window}: {', '.join(f'{role} {value:+.1f}%' for role, value in roles.items())}.\n"
            for window, roles in growth.items()
        )
    )
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / f"{args.results}.md").write_text(f"# Serve soak\n\n{text}")
    (RESULTS_DIR / f"{args.results}.json").write_text(
        json.dumps(
            {"summary": summary, "latency": rows, "statuses": dict(statuses), "memory": memory, "samples": samples},
            indent=2,
        )
    )
    print(f"\n{text}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--model", default=ServeSettings().model, help="checkpoint or bundled model name")
    parser.add_argument("--seconds", type=float, default=6.0, help="measurement time per cell")
    parser.add_argument("--port", type=int, default=8766)
    parser.add_argument("--results", default=None, help="results file name under benchmarks/results")
    parser.add_argument("--soak", action="store_true", help="the long run instead of the latency table")
    parser.add_argument("--minutes", type=float, default=10.0, help="soak length")
    parser.add_argument("--clients", type=int, default=32, help="soak clients")
    args = parser.parse_args()
    if args.soak:
        args.results = args.results or "serve-soak"
        soak(args)
        return
    args.results = args.results or "serve"

    load_before = os.getloadavg()
    side_by_side = ablation(args.model, args.seconds, args.port)
    apply_ray_serve_env(ServeSettings().ray_serve_env)  # the main table: `agepipe serve` as shipped
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        rows = benchmark(args.model, args.seconds, args.port)
    finally:
        stop_server()
        ray.shutdown()
    machine = {
        "cpus": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "replicas": 1,
        "replica_cpus": ServeSettings().num_cpus,
        "batch_sizes": BATCH_SIZES,
        "seconds_per_cell": args.seconds,
        "model": args.model or "default",
        "flip_tta": ServeSettings().flip_tta,
        "ray_serve_env": ServeSettings().ray_serve_env,
    }
    table = serving_table(rows)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    notes = (
        f"One replica ({machine['replica_cpus']} CPU) on local Ray, {machine['cpus']} CPUs, clients on the "
        f"same machine; load average before/after: {machine['load_average_before']} / "
        f"{machine['load_average_after']}. Model: {machine['model']}. Batching on = up to "
        f"{BATCH_SIZES['on']} requests per forward pass; off = 1. `agepipe serve` defaults: flip TTA "
        f"{'on' if machine['flip_tta'] else 'off'}, Ray Serve environment {machine['ray_serve_env']}.\n"
    )
    side_notes = "Side by side, faces 200x200 (`--detector none`), 32 clients, batching on, one fresh Ray per mode:\n"
    text = f"{notes}\n{table}\n\n{side_notes}\n{ablation_table(side_by_side)}\n"
    (RESULTS_DIR / f"{args.results}.md").write_text(f"# Serve benchmark\n\n{text}")
    (RESULTS_DIR / f"{args.results}.json").write_text(
        json.dumps({"machine": machine, "rows": rows, "side_by_side": side_by_side}, indent=2)
    )
    print(f"\n{text}")


if __name__ == "__main__":
    main()
