"""Run paths: one type for local paths and object-store URLs (`gs://bucket/run`, `s3://...`).

Every file a run writes or reads goes through `as_path`, an `etils.epath.Path` (what orbax and
grain already use). Local paths use the os backend, unchanged. `gs://` (and the other schemes
fsspec knows) use fsspec: gcsfs for GCS. etils picks tf.io.gfile instead when TensorFlow is
installed; tepo_jax does not install it, and gcsfs is the backend tested here (it honours
`STORAGE_EMULATOR_HOST`, so the tests run against a local GCS emulator).

Object stores have no append and no rename (GCS: a copy and a delete), but one upload of an
object is atomic: readers, and a run killed mid-write, see the old object or the new one,
never a part. So a file that grows (metrics.jsonl) is rewritten whole on a store
(`write_atomic`), and appended to locally as before.

Libraries that need local files (transformers' tokenizers, bm25s, memory-mapped safetensors)
get a local copy of a remote directory (`local_copy`) or write into a local directory that is
uploaded when they are done (`staged`); on a local path both are the path itself, no copy.
"""
from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from typing import Iterator, Union

import fsspec
import fsspec.asyn
from etils import epath

PathLike = Union[str, os.PathLike]
_URL = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")
# Schemes etils.epath sends to fsspec, and the fsspec package each needs.
_BACKENDS = {"gs": "gcsfs", "s3": "s3fs", "az": "adlfs", "hf": "huggingface_hub"}
_COPY_CHUNK = 16 << 20
# How long `check_store` waits for a store to answer. A bucket's metadata comes back in well under
# a second; without a network, gcsfs retries 6 times with backoff and logs a traceback (~80 s).
STORE_CHECK_TIMEOUT_S = 30.0

# gcsfs caches directory listings per process; the processes of a pod write one workdir (process
# 0 the tokenizer, data and sft_final the others then read), so a cached listing would hide
# their files. Listings are cheap next to what a run writes: no cache.
fsspec.config.conf.setdefault("gcs", {}).setdefault("use_listings_cache", False)


class PathError(ValueError):
    """A run path that cannot be used (missing backend package, bucket, credentials); one line."""


def scheme(p: PathLike) -> str | None:
    """'gs' for 'gs://b/x', None for a local path."""
    m = _URL.match(os.fspath(p)) if isinstance(p, (str, os.PathLike)) else None
    return m.group(1).lower() if m else None


def is_remote(p: PathLike) -> bool:
    return scheme(p) is not None


def as_path(p: PathLike) -> epath.Path:
    """The run path `p` as an epath.Path (a local path is expanded: `~` works as in a shell)."""
    if isinstance(p, epath.Path):
        return p
    s = os.fspath(p)
    return epath.Path(s if is_remote(s) else os.path.expanduser(s))


def absolute(p: PathLike) -> epath.Path:
    """As `as_path`, a local path made absolute (orbax wants absolute directories)."""
    path = as_path(p)
    return path if is_remote(path) else epath.Path(os.path.abspath(os.fspath(path)))


def check_store(p: PathLike) -> None:
    """A remote `p` is usable: its fsspec backend is installed and its bucket exists and can
    be read. PathError (one line) otherwise; a local path is not checked here."""
    s = scheme(p)
    if s is None:
        return
    package = _BACKENDS.get(s)
    if package is None:
        raise PathError(f"{os.fspath(p)}: unsupported scheme {s}:// (supported: "
                        f"{', '.join(k + '://' for k in _BACKENDS)})")
    try:
        __import__(package)
    except ImportError:
        raise PathError(f"{os.fspath(p)}: {s}:// paths need the {package} package "
                        f"(pip install {package})") from None
    bucket = os.fspath(p)[len(s) + 3:].split("/", 1)[0]
    with _quiet_logger(package) as retried:
        try:
            _bucket_info(s, bucket, STORE_CHECK_TIMEOUT_S)
        except FileNotFoundError:
            raise PathError(f"{os.fspath(p)}: bucket {bucket!r} does not exist (create it first, "
                            f"e.g. `gcloud storage buckets create {s}://{bucket}`)") from None
        except (TimeoutError, asyncio.TimeoutError):   # one class from Python 3.11
            last = f" (last error: {retried[-1].split('exception: ')[-1]})" if retried else ""
            raise PathError(f"{os.fspath(p)}: no answer about bucket {bucket!r} within "
                            f"{STORE_CHECK_TIMEOUT_S:g} s{last}; check the network and the "
                            "credentials") from None
        except Exception as e:  # noqa: BLE001 — auth, network errors: one line
            if "Forbidden" in str(e):  # may write objects without reading the bucket's metadata
                return              # (roles/storage.objectUser): the run's first write tells
            raise PathError(f"{os.fspath(p)}: cannot reach bucket {bucket!r} ({_first_line(e)})") from None


def _bucket_info(scheme_name: str, bucket: str, timeout: float) -> None:
    """The bucket's metadata from its store, or TimeoutError after `timeout` s. Both steps can
    wait: making the filesystem looks for credentials (gcsfs asks a cloud VM's metadata server,
    ~15 s off the cloud), and the request is retried with backoff. The probe runs on a daemon
    thread so a store that never answers cannot hold the process; on an async backend (gcsfs,
    s3fs) its request is cancelled at the deadline instead of retrying on in fsspec's IO thread."""
    deadline = time.monotonic() + timeout
    outcome: dict = {}

    def probe():
        try:
            fs = fsspec.filesystem(scheme_name)
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            if not getattr(fs, "async_impl", False):
                fs.info(bucket)
                return

            async def info_within():
                return await asyncio.wait_for(fs._info(bucket), left)

            fsspec.asyn.sync(fs.loop, info_within)
        except BaseException as e:  # noqa: BLE001 — handed to the caller's thread
            outcome["error"] = e

    thread = threading.Thread(target=probe, name=f"check-{scheme_name}-store", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise TimeoutError
    if "error" in outcome:
        raise outcome["error"]


@contextlib.contextmanager
def _quiet_logger(name: str) -> Iterator[list[str]]:
    """Keep logger `name` off stderr (gcsfs logs a traceback per failed request) and collect
    the first line of each message it logs, for our one-line error."""
    logger, messages = logging.getLogger(name), []

    class Collect(logging.Handler):
        def emit(self, record):
            messages.append(_first_line(record.getMessage()))

    handler, saved = Collect(logging.DEBUG), (logger.propagate, logger.level)
    logger.addHandler(handler)
    logger.propagate, logger.level = False, logging.DEBUG
    try:
        yield messages
    finally:
        logger.removeHandler(handler)
        logger.propagate, logger.level = saved


def write_atomic(path: PathLike, data: str | bytes) -> None:
    """Replace `path` with `data` so that a kill leaves the old content or the new, not a mix.
    Local: a temporary file renamed over it. Remote: one upload (atomic on object stores)."""
    path = as_path(path)
    mode = "wb" if isinstance(data, bytes) else "w"
    if is_remote(path):
        with path.open(mode) as f:
            f.write(data)
        return
    tmp = path.parent / f".{path.name}.tmp"
    with tmp.open(mode) as f:
        f.write(data)
    os.replace(tmp, path)


def copy_file(src: PathLike, dst: PathLike) -> None:
    """Stream one file between any two backends (a local file and an object, say)."""
    with as_path(src).open("rb") as a, as_path(dst).open("wb") as b:
        shutil.copyfileobj(a, b, _COPY_CHUNK)


def files_under(path: PathLike) -> Iterator[epath.Path]:
    """Every file below `path`, walked one directory at a time (epath refuses `**` on GCS)."""
    for child in as_path(path).iterdir():
        if child.is_dir():
            yield from files_under(child)
        else:
            yield child


def copy_tree(src: PathLike, dst: PathLike) -> None:
    """Copy the files under `src` to `dst`, keeping relative paths."""
    src, dst = as_path(src), as_path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    for child in src.iterdir():
        if child.is_dir():
            copy_tree(child, dst / child.name)
        else:
            copy_file(child, dst / child.name)


@contextlib.contextmanager
def local_copy(path: PathLike) -> Iterator[str]:
    """A local directory with the contents of `path`, for libraries that read local files
    only: `path` itself when it is local, else a temporary download removed afterwards."""
    if not is_remote(path):
        yield os.fspath(as_path(path))
        return
    tmp = tempfile.mkdtemp(prefix="tepo_jax-")
    try:
        if as_path(path).is_dir():
            copy_tree(path, tmp)
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def staged(path: PathLike) -> Iterator[str]:
    """A local directory to write `path`'s files into: `path` itself when it is local, else a
    temporary directory uploaded to `path` when the block ends without an error."""
    if not is_remote(path):
        as_path(path).mkdir(parents=True, exist_ok=True)
        yield os.fspath(as_path(path))
        return
    tmp = tempfile.mkdtemp(prefix="tepo_jax-")
    try:
        yield tmp
        copy_tree(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def download(path: PathLike) -> str:
    """A local copy of the remote directory `path` kept until the process exits, for data a
    library memory-maps for as long as it runs (a search index); a local `path` itself."""
    if not is_remote(path):
        return os.fspath(as_path(path))
    tmp = tempfile.mkdtemp(prefix="tepo_jax-")
    atexit.register(shutil.rmtree, tmp, True)
    copy_tree(path, tmp)
    return tmp


def _first_line(e: BaseException | str) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


def make_dir(path, what: str) -> epath.Path:
    """`path` as a directory, created if needed, before any work that will write there:
    PathError (one line, led by `what`: the flag or field) when a file stands where it or a
    parent should be, or it cannot be created or written."""
    p = as_path(path)
    if not is_remote(p):
        for part in (p, *p.parents):   # the nearest part that exists must be a directory
            if part.exists():
                if not part.is_dir():
                    raise PathError(f"{what}: {part} is a file, not a directory")
                break
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PathError(f"{what}: cannot create {p} ({e.strerror or e})") from None
    if not is_remote(p) and not os.access(p, os.W_OK):
        raise PathError(f"{what}: {p} is not writable")
    return p
