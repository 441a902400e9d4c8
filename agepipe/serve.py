"""Online age estimation: a Ray Serve application with a FastAPI ingress and an upload page.

`POST /predict` takes an image (raw body or multipart field `file`) and answers every face
with its box, age and its calibrated interval (`age_low`, `age_high`), age group and gender;
`POST /explain` answers a Grad-CAM overlay PNG of the largest face; `GET /healthz` answers 200 once
the model is loaded; `GET /` is the upload page. Bad input is a 4xx with a JSON `detail`, checked
before anything is decoded where it can be (body size, content type).

Two deployments: `AgeIngress` answers HTTP (reads and checks the request, serves the page) and calls
an `AgeService` model replica through a deployment handle. Inference is idempotent, so a request
whose model replica dies under it is sent again to a live one (or to its replacement); only when
that keeps failing does the client get a 503 with `Retry-After`, never a 500.

In a model replica each request decodes and detects on its own (one detector thread per replica),
then waits on `predict_faces`, which `@serve.batch` turns into one model forward pass for the faces
of all requests that arrived together. The request parsing and response shaping are plain functions.
"""

import asyncio
import dataclasses
import io
import os
import signal
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from python_multipart import parse_form
from python_multipart.multipart import Field, File
from ray import serve
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.deployment import Application
from ray.serve.handle import DeploymentHandle

from agepipe import config, storage
from agepipe.cluster import init_ray
from agepipe.config import ServeSettings
from agepipe.images import ImageError, SourceImage, encode

STATIC_DIR = Path(__file__).resolve().parent / "static"
UPLOAD_FIELD = "file"
RAW_CONTENT_TYPES = ("image/", "application/octet-stream")
MULTIPART_CONTENT_TYPE = "multipart/form-data"
# Decode failures are the client's: the body was not a usable image.
STATUS_BY_IMAGE_ERROR = {"empty": 400, "too_large": 413}
UNUSABLE_IMAGE_STATUS = 422
IMAGE_ERROR_DETAILS = {
    "empty": "empty image: the request carried no bytes",
    "not_image": "not an image: the bytes are in no known image format",
    "corrupt": "corrupt image: it could not be decoded",
    "truncated": "truncated image: the file ends early",
}

T = TypeVar("T")


class RequestError(Exception):
    """A client error: answered with `status` and JSON `{"detail": detail, "error": reason}`."""

    def __init__(self, status: int, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.reason = reason
        self.detail = detail

    def __reduce__(self) -> tuple[type, tuple[int, str, str]]:
        # Raised in a model replica and answered by the ingress: it crosses processes whole.
        return RequestError, (self.status, self.reason, self.detail)


def check_content_length(header: str | None, max_body_bytes: int) -> None:
    """Refuse a declared body over the limit before any of it is read."""
    if header is None:
        return
    try:
        declared = int(header)
    except ValueError:
        raise RequestError(400, "bad_content_length", f"invalid Content-Length {header!r}") from None
    if declared > max_body_bytes:
        raise RequestError(413, "body_too_large", body_too_large_detail(max_body_bytes))


def body_too_large_detail(max_body_bytes: int) -> str:
    return f"request body exceeds {max_body_bytes} bytes"


def upload_kind(content_type: str | None) -> str:
    """`multipart` or `raw` for an accepted Content-Type; a missing one means raw bytes."""
    media_type = (content_type or "").split(";", 1)[0].strip().lower()
    if media_type == MULTIPART_CONTENT_TYPE:
        return "multipart"
    if not media_type or media_type.startswith(RAW_CONTENT_TYPES):
        return "raw"
    raise RequestError(
        415,
        "unsupported_media_type",
        f"unsupported Content-Type {media_type!r}: send the image as the body with an image/* or "
        f"application/octet-stream type, or as multipart/form-data field {UPLOAD_FIELD!r}",
    )


def multipart_file(body: bytes, content_type: str, field_name: str = UPLOAD_FIELD) -> bytes:
    """The bytes of one multipart/form-data field (a file part or a plain value)."""
    found: list[bytes] = []
    wanted = field_name.encode()

    def on_file(part: File) -> None:
        if part.field_name == wanted:
            part.file_object.seek(0)
            found.append(part.file_object.read())

    def on_field(part: Field) -> None:
        if part.field_name == wanted:
            found.append(part.value or b"")

    headers = {"Content-Type": content_type.encode("latin-1"), "Content-Length": str(len(body)).encode()}
    try:
        parse_form(headers, io.BytesIO(body), on_field, on_file)
    except ValueError as exc:  # python_multipart's parse errors are ValueErrors
        raise RequestError(400, "bad_multipart", f"malformed multipart body: {exc}") from None
    if not found:
        raise RequestError(400, "missing_file", f"multipart body has no field {field_name!r}")
    return found[0]


def upload_bytes(body: bytes, content_type: str | None) -> bytes:
    """The image bytes of a request: the raw body, or the multipart field `file`."""
    if upload_kind(content_type) == "multipart":
        return multipart_file(body, content_type or "")
    return body


def open_upload(data: bytes, max_pixels: int) -> SourceImage:
    """An uploaded image with its header read (its pixels are decoded as finely as its crops need); an
    unusable header becomes a 4xx RequestError."""
    try:
        return SourceImage(data, max_pixels)
    except ImageError as exc:
        raise image_request_error(exc.reason, str(exc)) from None


def image_request_error(reason: str, detail: str = "") -> RequestError:
    """The 4xx answer to an image that cannot be decoded for `reason`."""
    status = STATUS_BY_IMAGE_ERROR.get(reason, UNUSABLE_IMAGE_STATUS)
    return RequestError(status, reason, IMAGE_ERROR_DETAILS.get(reason, detail or reason))


def face_json(row: dict[str, Any], prediction: dict[str, Any]) -> dict[str, Any]:
    """One face of the response: box in source pixels, detector score and the predictions."""
    # Imported here, as model_location below: they load PyTorch, which the HTTP ingress (it imports
    # this module too) never needs (about 700 MB less in its process).
    from agepipe.predict import prediction_json

    return {
        "face_index": row["face_index"],
        "box": [round(float(row[k]), 1) for k in ("x1", "y1", "x2", "y2")],
        "score": round(float(row["score"]), 4),
        **prediction_json(prediction),
    }


def face_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The crop function's rows that hold a face (a `no_face` row holds none)."""
    return [row for row in rows if row["crop"] is not None]


def predict_response(
    rows: Sequence[dict[str, Any]], predictions: Sequence[dict[str, Any]], interval_level: float | None = None
) -> dict:
    """The `/predict` answer for one image: its faces (possibly none), its size, and the level of the faces'
    age intervals (None for a model without calibration)."""
    faces = face_rows(rows)
    if len(faces) != len(predictions):
        raise ValueError(f"{len(faces)} faces but {len(predictions)} predictions")
    return {
        "faces": [face_json(row, prediction) for row, prediction in zip(faces, predictions, strict=True)],
        "width": rows[0]["width"],
        "height": rows[0]["height"],
        "interval_level": interval_level,
    }


def largest_face(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The face with the largest box; a RequestError when the image has none."""
    faces = face_rows(rows)
    if not faces:
        raise RequestError(422, "no_face", "no face found in the image")
    return max(faces, key=lambda row: (row["x2"] - row["x1"]) * (row["y2"] - row["y1"]))


def split_by_counts(items: Sequence[T], counts: Sequence[int]) -> list[list[T]]:
    """Undo a concatenation: `counts[i]` consecutive items for each original list."""
    if sum(counts) != len(items):
        raise ValueError(f"counts add up to {sum(counts)}, not {len(items)}")
    parts, start = [], 0
    for count in counts:
        parts.append(list(items[start : start + count]))
        start += count
    return parts


def batch_wait_s(requests_at_model: int, busy_wait_s: float) -> float:
    """How long a new batch waits to fill: not at all when no other request is at the model."""
    return busy_wait_s if requests_at_model > 0 else 0.0


def replica_resources(settings: ServeSettings, cluster_gpus: float) -> dict[str, float]:
    """Ray resources of one replica: a GPU fraction only where the cluster has GPUs."""
    resources = {"num_cpus": settings.num_cpus}
    if cluster_gpus > 0:
        resources["num_gpus"] = settings.gpu_fraction
    return resources


def autoscaling_config(settings: ServeSettings) -> dict[str, Any]:
    """Scale replicas on queued + running requests per replica."""
    return {
        "min_replicas": settings.min_replicas,
        "max_replicas": settings.max_replicas,
        "target_ongoing_requests": settings.target_ongoing_requests,
    }


def with_absolute_paths(settings: ServeSettings) -> ServeSettings:
    """A copy whose local model and detector-weights paths are absolute."""
    crop = settings.crop_overrides
    if crop.detector_weights:
        crop = dataclasses.replace(crop, detector_weights=storage.absolute(crop.detector_weights))
    from agepipe.model import model_location

    return dataclasses.replace(settings, model=model_location(settings.model), crop_overrides=crop)


async def read_body(request: Request, max_body_bytes: int) -> bytes:
    """The request body, refused with 413 as soon as it is declared or read past the limit."""
    check_content_length(request.headers.get("content-length"), max_body_bytes)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_body_bytes:
            raise RequestError(413, "body_too_large", body_too_large_detail(max_body_bytes))
        chunks.append(chunk)
    return b"".join(chunks)


# A request is sent to a model replica at most this many times: a replica that died under it (killed,
# out of memory, its node lost) is replaced by Serve, and the handle holds a request until one is up.
REPLICA_ATTEMPTS = 3
REPLICA_RETRY_WAIT_S = 0.5
RETRY_AFTER_S = 5  # what a client is told to wait when every attempt found a dying replica


class ReplicaLost(Exception):
    """Every attempt at a request found its model replica dead: answered 503 with Retry-After."""


async def call_with_retries(call: Callable[[], Awaitable[T]], attempts: int, wait_s: float) -> T:
    """`call()`, made again (after `wait_s`, doubling) each time its replica died under it: Ray Serve's
    router stops sending to a replica once a call to it raised RayActorError."""
    for attempt in range(attempts):
        try:
            return await call()
        except RayActorError as exc:
            if attempt + 1 == attempts:
                raise ReplicaLost(f"{attempts} model replicas in a row died under the request") from exc
            await asyncio.sleep(wait_s * 2**attempt)
    raise ValueError(f"attempts must be at least 1, not {attempts}")


app = FastAPI(title="agepipe", description="Facial age, age group and gender estimation.")


@app.exception_handler(RequestError)
async def request_error_response(_request: Request, exc: RequestError) -> JSONResponse:
    return JSONResponse({"detail": exc.detail, "error": exc.reason}, status_code=exc.status)


@app.exception_handler(ReplicaLost)
async def replica_lost_response(_request: Request, exc: ReplicaLost) -> JSONResponse:
    detail = f"the model is restarting ({exc}): send the request again"
    return JSONResponse(
        {"detail": detail, "error": "replica_lost"}, status_code=503, headers={"Retry-After": str(RETRY_AFTER_S)}
    )


@serve.deployment(name="AgeService")
class AgeService:
    """One model replica: a Predictor, a detector thread and a model thread (the batched forward pass).
    It answers the ingress's calls: an upload's bytes in, the answer out."""

    def __init__(self, settings: ServeSettings) -> None:
        from agepipe.predict import Predictor

        self.settings = settings
        self.predictor = Predictor.from_settings(settings)
        # Single threads: the detector and the model are not shared between threads, and
        # detection of the next requests overlaps the forward pass of the current batch.
        self.detect_thread = ThreadPoolExecutor(1, thread_name_prefix="detect")
        self.model_thread = ThreadPoolExecutor(1, thread_name_prefix="model")
        self.predict_faces.set_max_batch_size(settings.batch_size)
        self.requests_at_model = 0
        self.started = time.time()
        # Load the detector and run the model once so that the first request is not the slow one.
        self.predictor.crop_images([np.full((64, 64, 3), 128, np.uint8)])
        self.predictor.predict_crops([np.full((64, 64, 3), 128, np.uint8)])

    async def _in_thread(self, pool: ThreadPoolExecutor, function: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(pool, function, *args)

    def _decode_and_crop(self, data: bytes) -> list[dict[str, Any]]:
        rows = self.predictor.crop_images([open_upload(data, self.predictor.crop.max_pixels)])[0]
        if rows[0]["error"] not in (None, "no_face"):  # a header that reads over pixels that do not
            raise image_request_error(rows[0]["error"])
        return rows

    async def _faces_of_upload(self, data: bytes) -> list[dict[str, Any]]:
        return await self._in_thread(self.detect_thread, self._decode_and_crop, data)

    async def predictions(self, crops: list[np.ndarray]) -> list[dict[str, Any]]:
        """This request's predictions, from a forward pass shared with the requests batched with it."""
        # Waiting for a batch to fill only pays while the model is busy: an idle model starts at once.
        wait_s = batch_wait_s(self.requests_at_model, self.settings.batch_wait_timeout_s)
        self.predict_faces.set_batch_wait_timeout_s(wait_s)
        self.requests_at_model += 1
        try:
            return await self.predict_faces(crops)
        finally:
            self.requests_at_model -= 1

    # The batch size and wait given here are replaced per replica and per request from ServeSettings.
    @serve.batch(max_batch_size=ServeSettings.batch_size, batch_wait_timeout_s=0.0)
    async def predict_faces(self, crops_per_request: list[list[np.ndarray]]) -> list[list[dict]]:
        """One forward pass for the faces of every request in the batch (size and wait set per request)."""
        crops = [crop for request_crops in crops_per_request for crop in request_crops]
        predictions = await self._in_thread(self.model_thread, self.predictor.predict_crops, crops)
        return split_by_counts(predictions, [len(request_crops) for request_crops in crops_per_request])

    async def health(self) -> dict[str, Any]:
        return {
            "status": "ok",
            "model": self.predictor.model_uri,
            "detector": self.predictor.crop.detector,
            "device": str(self.predictor.device),
            "replica": serve.get_replica_context().replica_id.unique_id,
            "pid": os.getpid(),
            "uptime_s": round(time.time() - self.started, 1),
        }

    async def predict(self, data: bytes) -> dict[str, Any]:
        rows = await self._faces_of_upload(data)
        crops = [row["crop"] for row in face_rows(rows)]
        predictions = await self.predictions(crops) if crops else []
        return predict_response(rows, predictions, self.predictor.level)

    async def explain(self, data: bytes) -> bytes:
        from agepipe.explain import explain_crop

        face = largest_face(await self._faces_of_upload(data))
        overlay = await self._in_thread(self.model_thread, explain_crop, self.predictor, face["crop"])
        return encode(overlay, "png")


@serve.deployment(name="AgeIngress")
@serve.ingress(app)
class AgeIngress:
    """HTTP in front of the model replicas: reads and checks each request, then calls a model replica
    through `model`, again on another if the one it was sent to dies (`call_with_retries`)."""

    def __init__(self, model: DeploymentHandle, settings: ServeSettings) -> None:
        self.model = model
        self.settings = settings
        self.page = (STATIC_DIR / "index.html").read_text()

    async def _model(self, method: str, *args: Any) -> Any:
        try:
            return await call_with_retries(
                lambda: getattr(self.model, method).remote(*args), REPLICA_ATTEMPTS, REPLICA_RETRY_WAIT_S
            )
        except RayTaskError as exc:
            if isinstance(exc.cause, RequestError):  # the model refused the upload: the client's 4xx
                raise exc.cause from None
            raise

    async def _upload(self, request: Request) -> bytes:
        body = await read_body(request, self.settings.max_body_bytes)
        return upload_bytes(body, request.headers.get("content-type"))

    @app.get("/", response_class=HTMLResponse)
    async def upload_page(self) -> HTMLResponse:
        return HTMLResponse(self.page)

    @app.get("/healthz")
    async def healthz(self) -> dict[str, Any]:
        return await self._model("health")

    @app.post("/predict")
    async def predict(self, request: Request) -> dict[str, Any]:
        return await self._model("predict", await self._upload(request))

    @app.post("/explain")
    async def explain(self, request: Request) -> Response:
        return Response(await self._model("explain", await self._upload(request)), media_type="image/png")


def application(settings: ServeSettings) -> Application:
    """The Serve application for these settings (autoscaling, replica resources, limits)."""
    import ray

    settings = with_absolute_paths(settings)
    cluster_gpus = ray.cluster_resources().get("GPU", 0) if ray.is_initialized() else 0
    model = AgeService.options(
        autoscaling_config=autoscaling_config(settings),
        max_ongoing_requests=settings.max_ongoing_requests,
        ray_actor_options=replica_resources(settings, cluster_gpus),
    ).bind(settings)
    # The ingress only reads requests and waits on the model: it reserves no CPU, and holds as many
    # requests as all model replicas together.
    return AgeIngress.options(
        num_replicas=1,
        max_ongoing_requests=settings.max_ongoing_requests * settings.max_replicas,
        ray_actor_options={"num_cpus": 0},
    ).bind(model, settings)


def app_builder(args: dict[str, Any]) -> Application:
    """Entry point for `serve run` / `serve deploy` config files: `args` are ServeSettings fields."""
    return application(config.from_dict(ServeSettings, args))


def apply_ray_serve_env(variables: dict[str, str]) -> None:
    """Export Serve's settings for a Ray started after this (its processes inherit the environment);
    variables the user has set already are kept."""
    for name, value in variables.items():
        os.environ.setdefault(name, value)


def start_server(settings: ServeSettings, name: str = "agepipe", route_prefix: str = "/") -> str:
    """Start Serve (and a local Ray if none is running) with this application; returns its URL."""
    import ray

    if not ray.is_initialized():
        apply_ray_serve_env(settings.ray_serve_env)
        init_ray(include_dashboard=False)
    serve.start(http_options={"host": settings.host, "port": settings.port})
    serve.run(application(settings), name=name, route_prefix=route_prefix)
    return f"http://{settings.host}:{settings.port}{route_prefix}"


def stop_server() -> None:
    """Stop every Serve application and the HTTP proxy (Ray itself keeps running)."""
    serve.shutdown()


def run_server(settings: ServeSettings) -> None:
    """Serve until Ctrl-C or SIGTERM, printing the URL once the model is loaded."""
    url = start_server(settings)
    print(f"agepipe serve: listening on {url} (upload page), POST {url}predict; Ctrl-C stops", flush=True)
    signal.signal(signal.SIGTERM, stop_on_signal)
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        stop_server()


def stop_on_signal(signum: int, _frame: Any) -> None:
    """Process managers stop services with SIGTERM: shut Serve down as Ctrl-C does."""
    raise KeyboardInterrupt(signal.Signals(signum).name)
