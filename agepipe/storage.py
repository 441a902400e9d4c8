"""URI -> filesystem for every read and write: local paths and `s3://` buckets.

S3 goes through s3fs (wrapped for pyarrow, so Ray Data reads and writes through
the same client). `AWS_ENDPOINT_URL` points it at any S3 API server.

Every S3 call is retried by botocore's standard policy (exponential backoff with jitter on throttling,
5xx answers and lost connections). A store that keeps failing past the retries is an outage:
`StorageUnavailable`, which names the store and the URI, and which `outage_in` finds again in the
error a Ray job raises, so that the command line reports it in one line. The retries every process
of a job needed are counted (`retries_needed`) for the job's summary.
"""

from __future__ import annotations

import errno
import os
import threading
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

import pyarrow.fs as pafs
import s3fs

from agepipe.config import IMAGE_EXTENSIONS

# Five attempts wait at most 1 + 2 + 4 + 8 = 15 s between them (jitter makes it 7.5 s on average):
# throttling and blips pass unseen, and an outage stops a job instead of stalling every worker.
S3_CLIENT_CONFIG = {
    "retries": {"mode": "standard", "total_max_attempts": 5},
    "connect_timeout": 5,
    "read_timeout": 60,
}
# Errors that say the store, not the object, failed: s3fs's for 503 (SlowDown, ServiceUnavailable) and
# 500 (InternalError), and a connection timed out, refused or reset.
UNAVAILABLE_ERRNOS = {errno.EBUSY, errno.EREMOTEIO, errno.ETIMEDOUT, errno.ECONNREFUSED, errno.ECONNRESET}
RETRY_COUNTER_NAMESPACE = "agepipe"


class StorageError(RuntimeError):
    """Storage that cannot be reached or a location that does not exist."""


class StorageUnavailable(StorageError):
    """The store failed every attempt at a call until the retries ran out: an outage, or a wrong endpoint."""

    def __init__(self, uri: str, reason: str) -> None:
        self.uri = uri
        self.reason = reason
        super().__init__(f"{store_of(uri)} did not answer for {uri}: {reason}")

    def __reduce__(self) -> tuple[type, tuple[str, str]]:
        # Raised in a Ray worker, reported by the driver: it crosses processes whole.
        return StorageUnavailable, (self.uri, self.reason)


def store_of(uri: str) -> str:
    """The store that holds `uri`, in words: S3 and the endpoint it is reached at."""
    if uri.startswith("s3://"):
        return f"S3 at {os.environ.get('AWS_ENDPOINT_URL') or 'its AWS endpoint'}"
    return "local storage"


def _error_chain(exc: BaseException) -> Iterator[BaseException]:
    """`exc` and every error behind it, nearest first: causes, contexts and the errors Ray wraps from
    other processes."""
    seen: set[int] = set()
    queue: deque[BaseException | None] = deque([exc])
    while queue:
        error = queue.popleft()
        if error is None or id(error) in seen:
            continue
        seen.add(id(error))
        yield error
        queue += [error.__cause__, error.__context__, getattr(error, "cause", None)]


def is_unavailable(error: BaseException) -> bool:
    """Whether one error (not its chain) says the store failed rather than one object."""
    from botocore.exceptions import ConnectionError as BotoConnectionError
    from botocore.exceptions import HTTPClientError
    from fsspec.exceptions import FSTimeoutError

    if isinstance(error, StorageUnavailable | BotoConnectionError | HTTPClientError | FSTimeoutError):
        return True
    return isinstance(error, OSError) and error.errno in UNAVAILABLE_ERRNOS


def outage_in(exc: BaseException) -> BaseException | None:
    """The error behind `exc` that says a store was unavailable, or None: a StorageUnavailable (which
    names the URI) where there is one; the innermost, which has the store's own words, not a wrapper's."""
    chain = list(_error_chain(exc))
    named = [e for e in chain if isinstance(e, StorageUnavailable)]
    unavailable = [e for e in chain if is_unavailable(e)]
    innermost = named or unavailable
    return innermost[-1] if innermost else None


def reason(error: BaseException) -> str:
    """An error's message on one line, without the errno prefix."""
    text = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
    return " ".join(text.split()) or type(error).__name__


@contextmanager
def unavailable_as_storage_error(uri: str) -> Iterator[None]:
    """Re-raise an error that says the store of `uri` is unavailable as a StorageUnavailable naming it.

    It is not an OSError, so that code that treats an unreadable file as that file's fault does not
    record a whole outage as bad files."""
    try:
        yield
    except StorageError:
        raise
    except Exception as exc:
        if is_remote(uri) and is_unavailable(exc):
            raise StorageUnavailable(uri, reason(exc)) from exc
        raise


_retries = {"counted": 0}
_retries_lock = threading.Lock()


def _count_retries(parsed: dict | None = None, **_: object) -> None:
    """botocore's `after-call` hook: add the retries a call needed to this process's count, and in a Ray
    worker to the job's counter (`retries_needed` adds them up on the driver)."""
    retries = ((parsed or {}).get("ResponseMetadata") or {}).get("RetryAttempts", 0)
    if not retries:
        return
    with _retries_lock:
        _retries["counted"] += retries
    import ray

    if ray.is_initialized() and ray.get_runtime_context().worker.mode == ray.WORKER_MODE:
        # Detached, so that it outlives the worker that made it; the driver ends it once it has read it.
        counter = (
            ray.remote(RetryCounter)
            .options(
                name=_retry_counter_name(),
                namespace=RETRY_COUNTER_NAMESPACE,
                get_if_exists=True,
                lifetime="detached",
                num_cpus=0,
            )
            .remote()
        )
        # Waited for, so that the driver, which reads the count once its workers are done, sees it.
        ray.get(counter.add.remote(retries))


def _retry_counter_name() -> str:
    import ray

    return f"storage-retries-{ray.get_runtime_context().get_job_id()}"


class RetryCounter:
    """The storage retries of a job's Ray workers (a named actor, created by the first that retries)."""

    def __init__(self) -> None:
        self.total = 0

    def add(self, retries: int) -> None:
        self.total += retries

    def count(self) -> int:
        return self.total


def retries_needed() -> int:
    """Storage retries this job needed so far: the driver's own and, once Ray runs, its workers'.

    Reading the workers' count ends their counter, so call it once, when the job is done."""
    import ray

    counted = _retries["counted"]
    if not ray.is_initialized():
        return counted
    try:
        counter = ray.get_actor(_retry_counter_name(), namespace=RETRY_COUNTER_NAMESPACE)
    except ValueError:
        return counted
    counted += ray.get(counter.count.remote())
    ray.kill(counter)
    return counted


class _S3(s3fs.S3FileSystem):
    """s3fs whose client counts the retries of every call."""

    async def set_session(self, refresh: bool = False, kwargs: dict | None = None) -> object:
        client = await super().set_session(refresh, kwargs or {})
        client.meta.events.register("after-call.s3", _count_retries, unique_id="agepipe-retry-count")
        return client


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def absolute(uri: str | None) -> str | None:
    """A local path made absolute (Ray workers, replicas and Tune trials may run in another
    directory); URIs, None and "" unchanged."""
    if not uri or is_remote(uri):
        return uri
    return str(Path(uri).resolve())


@lru_cache(maxsize=8)
def _s3fs(endpoint: str | None) -> _S3:
    client_kwargs = {"endpoint_url": endpoint} if endpoint else {}
    return _S3(client_kwargs=client_kwargs, config_kwargs=S3_CLIENT_CONFIG, skip_instance_cache=True)


@lru_cache(maxsize=8)
def _s3_filesystem(endpoint: str | None) -> pafs.FileSystem:
    return pafs.PyFileSystem(pafs.FSSpecHandler(_s3fs(endpoint)))


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """Filesystem and in-filesystem path for a local path, `file://` or `s3://` URI."""
    if uri.startswith("s3://"):
        return _s3_filesystem(os.environ.get("AWS_ENDPOINT_URL")), uri[len("s3://") :].rstrip("/")
    local = uri.removeprefix("file://")
    if is_remote(local):
        raise StorageError(f"unsupported storage scheme in {local!r}: use a local path or s3://")
    return pafs.LocalFileSystem(), str(local_path(local).resolve())


def local_path(uri: str) -> Path:
    """The path of a local path or `file://` URI, `~` expanded."""
    return Path(uri.removeprefix("file://")).expanduser()


def to_uri(uri_like: str, fs_path: str) -> str:
    """The URI of `fs_path` in the same storage as `uri_like`."""
    return f"s3://{fs_path}" if uri_like.startswith("s3://") else fs_path


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *parts])


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def list_images(uri: str) -> tuple[list[str], int]:
    """Image-file URIs under `uri`, recursive and sorted, and the count of other files skipped.

    Raises StorageError when the location cannot be listed.
    """
    fs, root = resolve(uri)
    with named_errors(uri, "list"):
        info = fs.get_file_info(root)
        if info.type == pafs.FileType.File:
            entries = [info]
        elif info.type == pafs.FileType.Directory:
            entries = fs.get_file_info(pafs.FileSelector(root, recursive=True))
        else:
            raise StorageError(f"input {uri!r} does not exist")
    files = [e.path for e in entries if e.type == pafs.FileType.File]
    images = sorted(to_uri(uri, p) for p in files if is_image_name(p))
    return images, len(files) - len(images)


@contextmanager
def named_errors(uri: str, action: str) -> Iterator[None]:
    """Storage errors as StorageErrors that name `uri`: StorageUnavailable for an outage, else
    "cannot ACTION URI: reason" (a missing bucket, denied access)."""
    try:
        with unavailable_as_storage_error(uri):
            yield
    except StorageError:
        raise
    except PermissionError as exc:
        raise StorageError(f"cannot {action} {uri!r}: access denied ({exc})") from exc
    except Exception as exc:
        raise StorageError(f"cannot {action} {uri!r}: {exc}") from exc


def read_bytes(uri: str) -> bytes:
    """The bytes of one file. A file that cannot be read raises an OSError; a store that does not
    answer raises StorageUnavailable."""
    if not is_remote(uri):
        # Straight from the OS: about a quarter of the time of resolving the path and opening an Arrow stream.
        return local_path(uri).read_bytes()
    if not uri.startswith("s3://"):
        raise StorageError(f"unsupported storage scheme in {uri!r}: use a local path or s3://")
    # One GET, straight from s3fs: pyarrow's wrapper first asks whether the file exists and answers
    # "not found" to any error, which would record an outage as missing files.
    with unavailable_as_storage_error(uri):
        return _s3fs(os.environ.get("AWS_ENDPOINT_URL")).cat_file(uri[len("s3://") :])


def write_bytes(uri: str, data: bytes) -> None:
    fs, path = resolve(uri)
    with named_errors(uri, "write"):
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        with fs.open_output_stream(path) as f:
            f.write(data)


def require_bucket(uri: str) -> None:
    """Refuse an `s3://` output whose bucket does not exist: s3fs would create it on the first write, so a
    mistyped bucket name would become a new bucket."""
    if not uri.startswith("s3://"):
        return
    bucket = uri[len("s3://") :].split("/", 1)[0]
    fs, _ = resolve(uri)
    with named_errors(uri, "write to"):
        missing = fs.get_file_info(bucket).type == pafs.FileType.NotFound
    if missing:
        raise StorageError(f"output {uri!r}: bucket {bucket!r} does not exist (agepipe does not create buckets)")


def exists(uri: str) -> bool:
    fs, path = resolve(uri)
    with named_errors(uri, "read"):
        return fs.get_file_info(path).type != pafs.FileType.NotFound


def local_copy(uri: str, cache_dir: str | None = None) -> str:
    """A local file path for `uri`: itself when local, else a cached download (http(s), s3)."""
    if not is_remote(uri):
        path = resolve(uri)[1]
        if not Path(path).is_file():
            raise StorageError(f"file not found: {uri}")
        return path
    target = _cache_path(uri, cache_dir)
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(target.suffix + ".part")
        try:
            tmp.write_bytes(_download(uri))
        except StorageError:
            raise
        except Exception as exc:
            raise StorageError(f"cannot download {uri}: {exc}") from exc
        tmp.rename(target)
    return str(target)


def _download(uri: str) -> bytes:
    if uri.startswith(("http://", "https://")):
        import urllib.request

        with urllib.request.urlopen(uri, timeout=60) as response:
            return response.read()
    return read_bytes(uri)


def _cache_path(uri: str, cache_dir: str | None) -> Path:
    import hashlib

    root = Path(cache_dir or os.environ.get("AGEPIPE_CACHE", Path.home() / ".cache" / "agepipe"))
    digest = hashlib.sha256(uri.encode()).hexdigest()[:16]
    return root / digest / uri.rstrip("/").rsplit("/", 1)[-1]
