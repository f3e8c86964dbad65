"""Where data lives: a local folder or an object-store URI, one resolution for every room.

Every data path of the platform (``--input`` / ``--output`` of the ingest, ``--data`` of training
and evaluation, ``train.storage_path``) may be a local path or a bucket URI (``s3://bucket/key``,
``gs://``, ``abfs://``). :func:`as_location` turns the value into either a :class:`pathlib.Path`
(local: nothing changes for local folders) or a :class:`StoragePath` (a bucket URI), which offers
the few ``Path`` operations the rooms use (``/``, ``name``, ``parent``, ``suffix``, ``exists``,
``is_file``, ``is_dir``, ``read_text``, ``read_bytes``, ``glob``, ``rglob``, ``unlink``, ``mkdir``,
``stat().st_size``, ``open("rb")``), so one code path serves both. A :class:`StoragePath` has no
``__fspath__`` on purpose: handing it to code that only knows local files fails loudly instead of
creating a local folder named ``s3:``.

Why pyarrow filesystems (``pyarrow.fs``) rather than fsspec: pyarrow is already the format layer
(Parquet), its ``S3FileSystem`` / ``GcsFileSystem`` / ``AzureFileSystem`` ship in the pyarrow wheel
(no extra package), Parquet reads through it are ranged reads of just the row groups a reader asks
for, and Ray Data and Ray Train take a ``pyarrow.fs.FileSystem`` directly
(``RunConfig(storage_filesystem=...)``), so the training checkpoints go through the same object.

Credentials come only from the standard places (environment ``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN``, ``AWS_PROFILE`` and ``~/.aws``, web identity,
instance / pod role), read by the cloud SDK itself; nothing here stores or logs them. The endpoint
is ``AWS_ENDPOINT_URL`` (botocore reads it; pyarrow's S3 client does not, apache/arrow#49643, so it
is passed as ``endpoint_override``) and the region ``AWS_DEFAULT_REGION`` / ``AWS_REGION``.

Errors: :class:`StorageError` (a ``ConfigError``) for what the user gave (an unknown scheme, a
bucket that does not exist, no credentials), one line naming the URI, raised by
:func:`check_location` before any work; :class:`StorageUnavailableError` (an ``OSError``) when the
store cannot be reached (an infrastructure failure: the ingest records the video as ``failed``).
"""
from __future__ import annotations

import functools
import os
import re
import shutil
import tempfile
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path, PurePosixPath
from typing import Iterator, Optional, Union

from core.config import ConfigError

#: schemes a data path may use (``file://`` is a local path)
REMOTE_SCHEMES = ("s3", "gs", "gcs", "abfs", "abfss")
_URI_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://(.*)$")
_CONNECT_TIMEOUT_S = 5.0
_REQUEST_TIMEOUT_S = 60.0


class StorageError(ConfigError):
    """A data URI that cannot work (unknown scheme, missing bucket, no credentials): one line
    naming the URI."""


class StorageUnavailableError(OSError):
    """The object store could not be reached or failed a request (not the data's fault)."""


def scheme_of(value: object) -> Optional[str]:
    """The lower-case scheme of a ``scheme://...`` string, None for anything else (a local path)."""
    m = _URI_RE.match(str(value)) if isinstance(value, (str, StoragePath)) else None
    return m.group(1).lower() if m else None


def is_remote(value: object) -> bool:
    """True for a bucket URI (or a :class:`StoragePath`)."""
    return isinstance(value, StoragePath) or scheme_of(value) in REMOTE_SCHEMES


def _endpoint() -> tuple[Optional[str], str]:
    """(host[:port] or None, "http" | "https") of ``AWS_ENDPOINT_URL``."""
    url = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if not url:
        return None, "https"
    m = _URI_RE.match(url)
    if not m:
        return url.rstrip("/"), "https"
    return m.group(2).rstrip("/"), m.group(1).lower()


@functools.lru_cache(maxsize=16)
def _s3_filesystem(endpoint: Optional[str], scheme: str, region: str):
    from pyarrow import fs as pafs

    kwargs = dict(region=region, connect_timeout=_CONNECT_TIMEOUT_S, request_timeout=_REQUEST_TIMEOUT_S,
                  retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=3), scheme=scheme)
    if endpoint:
        kwargs.update(endpoint_override=endpoint)
    return pafs.S3FileSystem(**kwargs)


def filesystem_for(scheme: str):
    """The ``pyarrow.fs.FileSystem`` of a remote ``scheme``, built from the standard environment
    (cached per endpoint / region, so a process builds one client)."""
    from pyarrow import fs as pafs

    if scheme == "s3":
        endpoint, http = _endpoint()
        region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or "us-east-1"
        return _s3_filesystem(endpoint, http, region)
    if scheme in ("gs", "gcs"):
        return pafs.GcsFileSystem()
    if scheme in ("abfs", "abfss"):
        account = os.environ.get("AZURE_STORAGE_ACCOUNT_NAME") or os.environ.get("AZURE_STORAGE_ACCOUNT")
        if not account:
            raise StorageError(f"{scheme}:// needs AZURE_STORAGE_ACCOUNT_NAME in the environment")
        return pafs.AzureFileSystem(account_name=account)
    raise StorageError(f"unknown storage scheme {scheme}://")


def unavailable(uri: str, exc: BaseException) -> StorageUnavailableError:
    """A :class:`StorageUnavailableError` naming ``uri`` from a client error ``exc``."""
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return StorageUnavailableError(f"{uri}: object store request failed ({msg[:300]})")


def _is_not_found(exc: BaseException) -> bool:
    """A client error that says the object is absent (not that the store failed)."""
    text = str(exc).lower()
    return any(s in text for s in ("not found", "does not exist", "nosuchkey", "no such key"))


@dataclass(frozen=True)
class _Stat:
    st_size: int


class StoragePath:
    """A file or prefix in a bucket (``scheme://bucket/key``), with the ``Path`` operations the
    rooms use. Pickles as its URI (the filesystem is rebuilt from the environment in each process:
    a Ray worker on another node uses its own credentials)."""

    def __init__(self, uri: str):
        scheme = scheme_of(uri)
        if scheme not in REMOTE_SCHEMES:
            raise StorageError(f"{uri}: not a bucket URI ({', '.join(s + '://' for s in REMOTE_SCHEMES)})")
        rest = _URI_RE.match(uri).group(2)
        key = str(PurePosixPath("/" + rest))[1:] if rest.strip("/") else ""
        self.scheme = scheme
        self.bucket = key.split("/", 1)[0]
        self.key = key.split("/", 1)[1] if "/" in key else ""  # "" for the bucket itself
        self.uri = f"{scheme}://{key}"

    # --- identity --------------------------------------------------------------------------
    @property
    def fs(self):
        return filesystem_for(self.scheme)

    @property
    def fs_path(self) -> str:
        """The path in :attr:`fs` (``bucket/key``)."""
        return f"{self.bucket}/{self.key}" if self.key else self.bucket

    def __str__(self) -> str:
        return self.uri

    def __repr__(self) -> str:
        return f"StoragePath({self.uri!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, StoragePath) and other.uri == self.uri

    def __hash__(self) -> int:
        return hash(self.uri)

    def __reduce__(self):
        return (StoragePath, (self.uri,))

    def __truediv__(self, part) -> "StoragePath":
        part = str(part).strip("/")
        return StoragePath(f"{self.uri.rstrip('/')}/{part}") if part else self

    @property
    def name(self) -> str:
        return PurePosixPath(self.key).name if self.key else self.bucket

    @property
    def suffix(self) -> str:
        return PurePosixPath(self.name).suffix

    @property
    def stem(self) -> str:
        return PurePosixPath(self.name).stem

    @property
    def parent(self) -> "StoragePath":
        if not self.key:
            return self
        parent = str(PurePosixPath(self.key).parent)
        return StoragePath(f"{self.scheme}://{self.bucket}/{'' if parent == '.' else parent}")

    def resolve(self) -> "StoragePath":
        return self

    def expanduser(self) -> "StoragePath":
        return self

    def is_absolute(self) -> bool:
        return True

    def relative_to(self, other: "StoragePath") -> PurePosixPath:
        return PurePosixPath(self.fs_path).relative_to(other.fs_path)

    # --- queries ---------------------------------------------------------------------------
    def _info(self):
        try:
            return self.fs.get_file_info(self.fs_path)
        except OSError as exc:
            raise unavailable(self.uri, exc) from exc

    def exists(self) -> bool:
        from pyarrow import fs as pafs

        return self._info().type != pafs.FileType.NotFound

    def is_file(self) -> bool:
        from pyarrow import fs as pafs

        return self._info().type == pafs.FileType.File

    def is_dir(self) -> bool:
        from pyarrow import fs as pafs

        return self._info().type == pafs.FileType.Directory

    def stat(self) -> _Stat:
        info = self._info()
        if info.size is None:
            raise FileNotFoundError(f"{self.uri}: no such object")
        return _Stat(int(info.size))

    def _list(self, recursive: bool) -> list["StoragePath"]:
        from pyarrow import fs as pafs

        try:
            infos = self.fs.get_file_info(pafs.FileSelector(self.fs_path, allow_not_found=True, recursive=recursive))
        except OSError as exc:
            raise unavailable(self.uri, exc) from exc
        base = self.fs_path.rstrip("/")
        return [self / info.path[len(base) + 1:] for info in infos if info.path.startswith(base + "/")]

    def iterdir(self) -> Iterator["StoragePath"]:
        return iter(sorted(self._list(False), key=str))

    def glob(self, pattern: str) -> Iterator["StoragePath"]:
        """One level (``*.json``), as ``Path.glob`` without ``/`` or ``**``."""
        return iter(sorted((p for p in self._list(False) if fnmatch(p.name, pattern)), key=str))

    def rglob(self, pattern: str) -> Iterator["StoragePath"]:
        """Every object below (recursive) whose name matches ``pattern``."""
        return iter(sorted((p for p in self._list(True) if fnmatch(p.name, pattern)), key=str))

    # --- reading ---------------------------------------------------------------------------
    def open(self, mode: str = "rb"):
        """A seekable binary input file (``pyarrow.NativeFile``: ranged reads of the object)."""
        if mode not in ("r", "rb"):
            raise ValueError(f"{self.uri}: only reading is supported by open(); write with core.atomic_files")
        try:
            return self.fs.open_input_file(self.fs_path)
        except FileNotFoundError:
            raise
        except OSError as exc:
            if _is_not_found(exc):
                raise FileNotFoundError(f"{self.uri}: no such object") from exc
            raise unavailable(self.uri, exc) from exc

    def read_bytes(self) -> bytes:
        with self.open() as f:
            return f.read()

    def read_text(self, encoding: str = "utf-8") -> str:
        return self.read_bytes().decode(encoding)

    # --- writing (whole objects; atomic writers go through core.atomic_files) --------------
    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        """Nothing to create: a prefix exists as soon as an object is under it."""

    def unlink(self, missing_ok: bool = False) -> None:
        try:
            self.fs.delete_file(self.fs_path)
        except FileNotFoundError:
            if not missing_ok:
                raise
        except OSError as exc:
            if missing_ok and not self.exists():
                return
            raise unavailable(self.uri, exc) from exc

    def write_bytes(self, data: bytes) -> None:
        """One PUT of ``data`` (an object appears whole or not at all; for files a reader must
        never see half-published under a name that looks final, use ``core.atomic_files``)."""
        try:
            with self.fs.open_output_stream(self.fs_path) as f:
                f.write(data)
        except OSError as exc:
            raise unavailable(self.uri, exc) from exc

    def write_text(self, text: str, encoding: str = "utf-8") -> None:
        self.write_bytes(text.encode(encoding))

    def upload_tree(self, local: Path) -> None:
        """Copy the local folder ``local`` under this prefix (its files, recursively)."""
        from pyarrow import fs as pafs

        try:
            pafs.copy_files(str(local), self.fs_path, source_filesystem=pafs.LocalFileSystem(),
                            destination_filesystem=self.fs)
        except OSError as exc:
            raise unavailable(self.uri, exc) from exc

    def upload_from(self, local: Path) -> None:
        """Copy the local file ``local`` to this object (one PUT / multipart upload); pyarrow's
        ``copy_files`` copies a file or a folder alike, so this is :meth:`upload_tree`."""
        self.upload_tree(local)

    def download_to(self, local: Path) -> None:
        """Copy this object to the local file ``local`` (``FileNotFoundError`` when it does not
        exist, :class:`StorageUnavailableError` when the store fails)."""
        from pyarrow import fs as pafs

        try:
            pafs.copy_files(self.fs_path, str(local), source_filesystem=self.fs,
                            destination_filesystem=pafs.LocalFileSystem())
        except FileNotFoundError:
            raise
        except OSError as exc:
            if _is_not_found(exc):
                raise FileNotFoundError(f"{self.uri}: no such object") from exc
            raise unavailable(self.uri, exc) from exc

    def move_to(self, target: "StoragePath") -> None:
        """Server-side copy to ``target`` then delete of this object (S3 has no rename): the
        target appears complete or not at all."""
        try:
            self.fs.move(self.fs_path, target.fs_path)
        except OSError as exc:
            raise unavailable(target.uri, exc) from exc


Location = Union[Path, StoragePath]


def as_location(value: Union[str, os.PathLike, StoragePath]) -> Location:
    """``value`` as a :class:`StoragePath` (a bucket URI) or a :class:`~pathlib.Path` (a local
    path, ``file://`` URIs included; not resolved). Raises :class:`StorageError` for any other
    ``scheme://`` (never a local folder named after it)."""
    if isinstance(value, (Path, StoragePath)):
        return value
    text = os.fspath(value) if not isinstance(value, str) else value
    scheme = scheme_of(text)
    if scheme is None:
        return Path(text)
    if scheme == "file":
        return Path(_URI_RE.match(text).group(2) or "/")
    if scheme in REMOTE_SCHEMES:
        return StoragePath(text)
    raise StorageError(f"{text}: unknown storage scheme {scheme}:// (use a local path or "
                       f"{', '.join(s + '://' for s in REMOTE_SCHEMES)})")


def _has_credentials(scheme: str) -> bool:
    """Whether the standard credential chain finds anything (S3: botocore's chain, the one MLflow
    and the AWS tools use; other schemes: left to their SDK)."""
    if scheme != "s3":
        return True
    try:
        import botocore.session
    except ImportError:  # no botocore: pyarrow's own chain decides at the first request
        return True
    return botocore.session.Session().get_credentials() is not None


def check_location(value: Union[str, os.PathLike, StoragePath], what: str, must_exist: bool = False) -> Location:
    """The location of ``value`` after the checks that need no work: a known scheme, credentials,
    the bucket exists (and, with ``must_exist``, the object or prefix). ``what`` names the
    argument in the one-line :class:`StorageError` (``--input``, ``train.storage_path``). A
    local path is returned unchecked (its room checks it as before)."""
    try:
        loc = as_location(value)
    except StorageError as exc:
        raise StorageError(f"{what} {exc}") from None
    if not isinstance(loc, StoragePath):
        return loc
    if not loc.bucket:
        raise StorageError(f"{what} {value}: the URI names no bucket")
    if not _has_credentials(loc.scheme):
        raise StorageError(f"{what} {value}: no credentials found (set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, "
                           f"AWS_PROFILE, or give the node / pod a role)")
    from pyarrow import fs as pafs

    try:
        bucket = loc.fs.get_file_info(loc.bucket)
    except OSError as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise StorageError(f"{what} {value}: the object store cannot be used ({msg[:200]})") from None
    if bucket.type == pafs.FileType.NotFound:
        raise StorageError(f"{what} {value}: bucket {loc.bucket} does not exist")
    if must_exist and not loc.exists():
        raise StorageError(f"{what} {value}: no such object or prefix")
    return loc


@contextmanager
def local_copy(value: Union[str, os.PathLike, StoragePath], scratch: Optional[str] = None) -> Iterator[Path]:
    """A local file with the content of ``value`` for the block: a local path as it is; an object
    downloaded whole into a private temp folder (``scratch`` or the system's) and removed after.
    The file keeps the object's name. Raises :class:`StorageUnavailableError` when the download
    fails (the store, not the file), ``FileNotFoundError`` when the object does not exist.

    Why a whole copy and not ranged reads through PyAV: FFmpeg reads containers in small blocks
    and seeks to the index (``moov`` at the end of many mp4s), so ranged reads would be hundreds
    of requests per video; one GET streamed to disk costs one round trip and the disk bandwidth."""
    loc = as_location(value)
    if not isinstance(loc, StoragePath):
        yield loc
        return
    folder = Path(tempfile.mkdtemp(prefix="loopy_obj_", dir=scratch))
    try:
        local = folder / (loc.name or "object")
        loc.download_to(local)
        yield local
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def temp_key(target: StoragePath) -> StoragePath:
    """The temporary key an atomic writer of ``target`` uploads to first (beside it, hidden,
    with the writer's pid and thread, as core.atomic_files names local temp files)."""
    return target.parent / f".{target.name}.{os.getpid()}.{threading.get_ident()}.tmp"


def remove_tree(loc: Location) -> None:
    """Remove a folder / every object under a prefix; nothing when absent."""
    if isinstance(loc, StoragePath):
        from pyarrow import fs as pafs

        if loc._info().type == pafs.FileType.NotFound:
            return
        try:  # the objects under the prefix and its folder marker, if the client wrote one
            loc.fs.delete_dir(loc.fs_path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise unavailable(loc.uri, exc) from exc
        return
    shutil.rmtree(loc, ignore_errors=True)


def parquet_source(loc: Location):
    """What ``pyarrow.parquet`` reads ``loc`` from: the local path, or a seekable object file
    (row groups fetched by ranged reads)."""
    return loc.open("rb") if isinstance(loc, StoragePath) else loc


def pyarrow_filesystem(value: Union[str, os.PathLike, StoragePath]):
    """(filesystem, path) for a library that takes a ``pyarrow.fs`` pair (Ray Train's
    ``RunConfig(storage_path=, storage_filesystem=)``): the bucket's client and ``bucket/key``,
    or (None, the local path)."""
    loc = as_location(value)
    if isinstance(loc, StoragePath):
        return loc.fs, loc.fs_path
    return None, str(loc)
