"""URI -> filesystem for every read and write: local paths and `s3://` buckets.

S3 goes through s3fs (wrapped for pyarrow, so Ray Data reads and writes through
the same client). `AWS_ENDPOINT_URL` points it at any S3 API server.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import pyarrow.fs as pafs

from agepipe.config import IMAGE_EXTENSIONS


class StorageError(RuntimeError):
    """Storage that cannot be reached or a location that does not exist."""


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def absolute(uri: str | None) -> str | None:
    """A local path made absolute (Ray workers, replicas and Tune trials may run in another
    directory); URIs, None and "" unchanged."""
    if not uri or is_remote(uri):
        return uri
    return str(Path(uri).resolve())


@lru_cache(maxsize=8)
def _s3_filesystem(endpoint: str | None) -> pafs.FileSystem:
    import s3fs

    client_kwargs = {"endpoint_url": endpoint} if endpoint else {}
    fs = s3fs.S3FileSystem(client_kwargs=client_kwargs, skip_instance_cache=True)
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs))


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
    try:
        info = fs.get_file_info(root)
        if info.type == pafs.FileType.File:
            entries = [info]
        elif info.type == pafs.FileType.Directory:
            entries = fs.get_file_info(pafs.FileSelector(root, recursive=True))
        else:
            raise StorageError(f"input {uri!r} does not exist")
    except StorageError:
        raise
    except Exception as exc:
        raise StorageError(f"cannot list {uri!r}: {exc}") from exc
    files = [e.path for e in entries if e.type == pafs.FileType.File]
    images = sorted(to_uri(uri, p) for p in files if is_image_name(p))
    return images, len(files) - len(images)


def read_bytes(uri: str) -> bytes:
    if not is_remote(uri):
        # Straight from the OS: about a quarter of the time of resolving the path and opening an Arrow stream.
        return local_path(uri).read_bytes()
    fs, path = resolve(uri)
    with fs.open_input_stream(path) as f:
        return f.read()


def write_bytes(uri: str, data: bytes) -> None:
    fs, path = resolve(uri)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(data)


def exists(uri: str) -> bool:
    fs, path = resolve(uri)
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
