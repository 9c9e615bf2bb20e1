"""Where a store lives: a local folder, or any fsspec URL (s3://, gs://, az://, memory://, ...).

`store.py` does all Zarr I/O through Zarr's own stores (LocalStore for a folder, FsspecStore for
a URL); this module holds the few file operations around Zarr that the store and the claims
need: listing child folders, sizes, existence, exclusive creation, deletion. A local folder keeps
the exact behaviour of a plain path (rename, hard links, mtimes); an object store has no rename
and no hard links, so the store commits runs by an exclusive write of their metadata instead
(see `store.py`) and the claims use conditional writes (`claims.ObjectChunkClaims`).

Credentials and endpoints come from fsspec's usual configuration: environment variables
(`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, ..., or `FSSPEC_S3='{"endpoint_url": ...}'`), or fsspec's
config files. Listings are never cached: several machines write the same store. Missing
credentials (botocore's NoCredentialsError and its kin, which no filesystem turns into an
OSError) become one StoreError that says how to provide them.
"""

from __future__ import annotations

import functools
import os
import shutil
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from .errors import StoreError, UsageError


def is_url(path: str | Path) -> bool:
    """A fsspec URL (`proto://...`) other than a plain local `file://` path."""
    s = str(path)
    return "://" in s and not s.startswith("file://")


def store_exists(path: str | Path) -> bool:
    """Whether a store (its root zarr.json) exists at a folder or URL."""
    return location(path).exists("zarr.json")


class Location(ABC):
    """Operations on paths relative to a store's root ('' is the root; '/' separates parts)."""

    remote: bool = False

    @property
    @abstractmethod
    def path(self) -> Any:
        """The store's path as users see it: a Path for a folder, the URL string for an object store."""

    @abstractmethod
    def display(self, *parts: str) -> Any:
        """A path under the root, for messages (a Path for a folder, a URL string otherwise)."""

    @abstractmethod
    def exists(self, rel: str) -> bool: ...

    @abstractmethod
    def is_dir(self, rel: str) -> bool: ...

    @abstractmethod
    def dirs(self, rel: str = "") -> list[str]:
        """Names of the child folders (prefixes) of `rel`, sorted."""

    @abstractmethod
    def files(self, rel: str) -> list[str]:
        """Names of the files (objects) directly under `rel`, sorted."""

    @abstractmethod
    def size(self, rel: str = "") -> int:
        """Bytes of every file under `rel`."""

    @abstractmethod
    def read_bytes(self, rel: str) -> bytes | None:
        """The file's bytes; None if it does not exist."""

    @abstractmethod
    def write_bytes(self, rel: str, data: bytes) -> None: ...

    @abstractmethod
    def write_many(self, files: dict[str, bytes]) -> None:
        """Write several files (concurrently where the backend can)."""

    @abstractmethod
    def create(self, rel: str, data: bytes) -> bool:
        """Write the file only if it does not exist (atomic: exactly one of several writers wins)."""

    @abstractmethod
    def delete(self, rel: str) -> None:
        """Remove a file; a missing one is fine."""

    @abstractmethod
    def rmtree(self, rel: str) -> None:
        """Remove everything under `rel`; missing is fine."""

    @abstractmethod
    def zarr_store(self) -> Any:
        """What zarr.open_group takes for the root."""

    def claims(self, rel: str, timeout: float) -> Any:
        """The chunk claims kept under `rel` (see claims.py)."""
        from .claims import LocalChunkClaims, ObjectChunkClaims

        if self.remote:
            return ObjectChunkClaims(self, rel, timeout)
        return LocalChunkClaims(self.display(rel), timeout)


class LocalLocation(Location):
    """A folder on a local or shared (NFS, Lustre, GPFS) filesystem."""

    def __init__(self, root: str | Path) -> None:
        s = str(root)
        self.root = Path(s[len("file://") :] if s.startswith("file://") else s)

    @property
    def path(self) -> Path:
        return self.root

    def _p(self, rel: str) -> Path:
        return self.root / rel if rel else self.root

    def display(self, *parts: str) -> Path:
        return self.root.joinpath(*[p for p in parts if p])

    def exists(self, rel: str) -> bool:
        return self._p(rel).exists()

    def is_dir(self, rel: str) -> bool:
        return self._p(rel).is_dir()

    def dirs(self, rel: str = "") -> list[str]:
        p = self._p(rel)
        return sorted(c.name for c in p.iterdir() if c.is_dir()) if p.is_dir() else []

    def files(self, rel: str) -> list[str]:
        p = self._p(rel)
        return sorted(c.name for c in p.iterdir() if c.is_file()) if p.is_dir() else []

    def size(self, rel: str = "") -> int:
        return sum(f.stat().st_size for f in self._p(rel).rglob("*") if f.is_file())

    def mtime(self, rel: str) -> float:
        return self._p(rel).stat().st_mtime

    def read_bytes(self, rel: str) -> bytes | None:
        try:
            return self._p(rel).read_bytes()
        except FileNotFoundError:
            return None

    def write_bytes(self, rel: str, data: bytes) -> None:
        p = self._p(rel)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)

    def write_many(self, files: dict[str, bytes]) -> None:
        for rel, data in files.items():
            self.write_bytes(rel, data)

    def create(self, rel: str, data: bytes) -> bool:
        p = self._p(rel)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f".{p.name}.{os.getpid()}.{os.urandom(6).hex()}")
        tmp.write_bytes(data)
        try:
            os.link(tmp, p)  # exclusive, and safe on NFS (O_EXCL historically is not)
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)

    def delete(self, rel: str) -> None:
        self._p(rel).unlink(missing_ok=True)

    def rmtree(self, rel: str) -> None:
        shutil.rmtree(self._p(rel), ignore_errors=True)

    def zarr_store(self) -> str:
        return str(self.root)


# Exception classes (by name, so that no cloud SDK is imported to check) meaning "no usable
# credentials": botocore (s3fs), google-auth (gcsfs), azure-core / azure-identity (adlfs).
CREDENTIAL_ERRORS = frozenset(
    {
        "NoCredentialsError",
        "PartialCredentialsError",
        "CredentialRetrievalError",
        "NoAuthTokenError",
        "TokenRetrievalError",
        "SSOError",
        "ProfileNotFound",
        "DefaultCredentialsError",
        "RefreshError",
        "ClientAuthenticationError",
        "CredentialUnavailableError",
    }
)
CREDENTIAL_HINTS = {
    "s3": "set AWS_PROFILE (a profile in ~/.aws/credentials) or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
    "(AWS_ENDPOINT_URL for MinIO/Ceph); a public bucket needs none: FSSPEC_S3='{\"anon\": true}'",
    "gs": "set GOOGLE_APPLICATION_CREDENTIALS to a service-account key file, or run "
    "`gcloud auth application-default login`",
    "az": "set AZURE_STORAGE_CONNECTION_STRING, or AZURE_STORAGE_ACCOUNT_NAME with AZURE_STORAGE_ACCOUNT_KEY",
}
CREDENTIAL_HINTS.update(
    {
        "s3a": CREDENTIAL_HINTS["s3"],
        "gcs": CREDENTIAL_HINTS["gs"],
        "abfs": CREDENTIAL_HINTS["az"],
        "abfss": CREDENTIAL_HINTS["az"],
    }
)


def credentials_error(exc: BaseException) -> BaseException | None:
    """The missing-credentials error in `exc`'s chain (causes and contexts), if there is one."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if any(cls.__name__ in CREDENTIAL_ERRORS for cls in type(e).__mro__):
            return e
        todo += [e.__cause__, e.__context__]
    return None


F = TypeVar("F", bound=Callable[..., Any])


def _credentials_checked(method: F) -> F:
    """Turn a cloud SDK's missing-credentials error (not an OSError, so a traceback otherwise) into a
    StoreError saying how to provide them; every other error passes unchanged."""

    @functools.wraps(method)
    def wrapper(self: FsspecLocation, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except Exception as exc:
            missing = credentials_error(exc)
            if missing is None:
                raise
            raise StoreError(self.no_credentials(missing)) from None

    return wrapper  # type: ignore[return-value]


class FsspecLocation(Location):
    """Any fsspec filesystem; conditional creation uses the backend's `mode="create"` writes
    (S3 `If-None-Match: *`, supported by AWS S3, MinIO, Ceph RGW, moto; GCS and Azure likewise)."""

    remote = True

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None) -> None:
        import fsspec.core

        self.url = url.rstrip("/")
        self.options = {"use_listings_cache": False, **(storage_options or {})}
        try:
            self.fs, self.root = fsspec.core.url_to_fs(self.url, skip_instance_cache=True, **self.options)
        except ImportError as exc:
            proto = self.url.split("://")[0]
            hint = {"s3": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs"}.get(proto, str(exc))
            raise UsageError(f"{self.url}: the {proto}:// filesystem needs {hint} (pip install {hint})") from None
        except (ValueError, TypeError) as exc:
            raise StoreError(f"{self.url}: not a store URL fsspec can open ({exc})") from None
        self.root = self.root.rstrip("/")

    @property
    def path(self) -> str:
        return self.url

    def no_credentials(self, exc: BaseException) -> str:
        """One line: which URL, what the SDK said, and how to give credentials for its protocol."""
        proto = self.url.split("://", 1)[0]
        hint = CREDENTIAL_HINTS.get(
            proto, f"configure them for fsspec's {proto}:// filesystem (FSSPEC_{proto.upper()})"
        )
        said = " ".join(str(exc).split()) or "no detail"
        return f"{self.url}: no credentials for {proto}:// could be used ({type(exc).__name__}: {said}); {hint}"

    def _k(self, rel: str) -> str:
        return f"{self.root}/{rel}" if rel else self.root

    def display(self, *parts: str) -> str:
        return "/".join([self.url, *[p for p in parts if p]])

    @_credentials_checked
    def exists(self, rel: str) -> bool:
        return bool(self.fs.exists(self._k(rel)))

    @_credentials_checked
    def is_dir(self, rel: str) -> bool:
        return bool(self.fs.isdir(self._k(rel)))

    @_credentials_checked
    def _ls(self, rel: str) -> list[dict[str, Any]]:
        try:
            return list(self.fs.ls(self._k(rel), detail=True))
        except FileNotFoundError:
            return []

    def dirs(self, rel: str = "") -> list[str]:
        return sorted(e["name"].rstrip("/").rsplit("/", 1)[-1] for e in self._ls(rel) if e["type"] == "directory")

    def files(self, rel: str) -> list[str]:
        return sorted(e["name"].rsplit("/", 1)[-1] for e in self._ls(rel) if e["type"] != "directory")

    @_credentials_checked
    def size(self, rel: str = "") -> int:
        try:
            return int(self.fs.du(self._k(rel), total=True))
        except FileNotFoundError:
            return 0

    @_credentials_checked
    def read_bytes(self, rel: str) -> bytes | None:
        try:
            return bytes(self.fs.cat_file(self._k(rel)))
        except FileNotFoundError:
            return None

    @_credentials_checked
    def write_bytes(self, rel: str, data: bytes) -> None:
        self.fs.pipe_file(self._k(rel), data)

    @_credentials_checked
    def write_many(self, files: dict[str, bytes]) -> None:
        if files:
            self.fs.pipe({self._k(rel): data for rel, data in files.items()})

    @_credentials_checked
    def create(self, rel: str, data: bytes) -> bool:
        try:
            self.fs.pipe_file(self._k(rel), data, mode="create")
        except FileExistsError:
            return False
        except (NotImplementedError, TypeError, ValueError) as exc:
            raise StoreError(
                f"{self.url}: this filesystem cannot write a file only if it is absent ({exc}); concurrent writers "
                "need that. Use --shard I/N with one process per shard (shards never share a chunk) on a store "
                "created by one process first"
            ) from None
        return True

    @_credentials_checked
    def delete(self, rel: str) -> None:
        try:
            self.fs.rm_file(self._k(rel))
        except FileNotFoundError:
            return

    @_credentials_checked
    def rmtree(self, rel: str) -> None:
        try:
            self.fs.rm(self._k(rel), recursive=True)
        except FileNotFoundError:
            return

    def zarr_store(self) -> Any:
        import zarr.storage

        return zarr.storage.FsspecStore.from_url(self.url, storage_options=self.options)


def location(path: str | Path) -> Location:
    return FsspecLocation(str(path)) if is_url(path) else LocalLocation(path)
