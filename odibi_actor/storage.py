"""Durable storage: one async key/value interface over local disk, Azure Blob Storage and memory.

Checkpoints and the result cache are built on it, so every backend promises the same things:
a reader sees a whole old value or a whole new one, never a partial write, and
``put_if_absent`` lets exactly one of several racing writers (processes or machines) win.

Pick a backend by URL with :func:`open_storage`:

- ``file:///abs/path`` (or a plain path): files under a directory; writes go to a temporary
  file that is fsynced, then renamed (``put``) or hard-linked (``put_if_absent``) into place.
- ``az://container/prefix``: Azure Blob Storage; ``put_if_absent`` is an ``If-None-Match: *``
  upload. Credentials come from the environment (see :class:`AzureStorage`).
- ``memory://name``: a dict in this process, shared by every store opened with the same name.

Keys are ``/``-separated relative names such as ``cache/ab/cdef``. Absolute paths, empty,
``.`` and ``..`` segments and backslashes are rejected, so no key can leave the store's root.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import secrets
import stat
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, NoReturn, Self
from urllib.parse import unquote, urlsplit

import aiofiles
import aiofiles.os

from ._logging import get_logger
from .errors import OdibiError

if TYPE_CHECKING:
    from azure.core.exceptions import AzureError
    from azure.storage.blob.aio import ContainerClient

__all__ = [
    "AzureStorage",
    "FileStorage",
    "MemoryStorage",
    "Storage",
    "StorageError",
    "StorageKeyError",
    "StorageUnavailable",
    "check_key",
    "open_storage",
]

log = get_logger("odibi_actor.storage")

SUPPORTED = "file:///absolute/path (or a plain path), memory://name, az://container/prefix"
# Temporary files of FileStorage start with this; keys may not, so a key never names one.
TEMP_MARK = ".odibi-tmp."


# --- errors ------------------------------------------------------------------------------
class StorageError(OdibiError):
    """A storage operation failed. Names the store and the key, never a credential."""

    def __init__(self, message: str, store: str = "", key: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.store = store
        self.key = key

    def __str__(self) -> str:
        return self.message


class StorageKeyError(StorageError, KeyError):
    """The key is not in the store."""

    def __init__(self, key: str, store: str) -> None:
        super().__init__(f"no key {key!r} in {store}", store, key)


class StorageUnavailable(StorageError):
    """The store could not be reached (connection refused, timeout, 5xx): worth a retry later,
    unlike a missing key or a refused credential."""


# --- keys --------------------------------------------------------------------------------
def check_key(key: str, what: str = "key") -> str:
    """Return ``key`` if it is a safe relative name; else raise ValueError naming it."""
    if not isinstance(key, str) or not key:
        raise ValueError(f"storage {what} must be a non-empty string, got {key!r}")
    problem = None
    if "\\" in key:
        problem = "contains a backslash; use '/' to separate segments"
    elif "\x00" in key:
        problem = "contains a NUL character"
    elif key.startswith("/"):
        problem = "is absolute; keys are relative to the store"
    else:
        for seg in key.split("/"):
            if seg in ("", ".", ".."):
                problem = f"has an empty, '.' or '..' segment ({seg!r})"
                break
            if seg.startswith(TEMP_MARK):
                problem = f"has a segment starting with {TEMP_MARK!r}, reserved for temporary files"
                break
    if problem:
        raise ValueError(f"invalid storage {what} {key!r}: {problem}")
    return key


def _check_prefix(prefix: str) -> str:
    """A list prefix is a key, or a key with a trailing '/', or ''."""
    if prefix:
        check_key(prefix[:-1] if prefix.endswith("/") else prefix, "prefix")
    return prefix


def _as_bytes(data: bytes | bytearray | memoryview) -> bytes:
    if isinstance(data, bytes):
        return data
    if isinstance(data, bytearray | memoryview):
        return bytes(data)
    raise TypeError(f"storage values are bytes, got {type(data).__name__}")


# --- the interface -----------------------------------------------------------------------
class Storage(ABC):
    """Async key/value store. Public methods validate keys, then call the backend's ``_op``.

    Every write is atomic: a concurrent ``get`` returns the old value or the new one.
    ``put_if_absent`` never overwrites, so among racing writers exactly one gets True.
    """

    #: Where the data lives, safe to log: no credentials.
    url: str

    @property
    def where(self) -> str:
        """The store as error messages name it."""
        return self.url

    async def put(self, key: str, data: bytes) -> None:
        """Store ``data`` under ``key``, replacing any old value atomically."""
        await self._put(check_key(key), _as_bytes(data))

    async def put_if_absent(self, key: str, data: bytes) -> bool:
        """Store ``data`` only if ``key`` has no value: True if written, False if it existed."""
        return await self._put_if_absent(check_key(key), _as_bytes(data))

    async def get(self, key: str) -> bytes:
        """The value of ``key``; :class:`StorageKeyError` when there is none."""
        return await self._get(check_key(key))

    async def exists(self, key: str) -> bool:
        return await self._exists(check_key(key))

    async def list(self, prefix: str = "") -> list[str]:
        """Sorted keys starting with ``prefix`` (a plain string prefix, as in Azure)."""
        return sorted(await self._list(_check_prefix(prefix)))

    async def delete(self, key: str) -> None:
        """Remove ``key``; a missing key is fine, so deleting twice is harmless."""
        await self._delete(check_key(key))

    async def modified(self, key: str) -> float:
        """When ``key`` was last written, in epoch seconds (for TTLs and purges)."""
        return await self._modified(check_key(key))

    async def close(self) -> None:  # noqa: B027 - optional for backends without resources
        """Release connections; the store is unusable afterwards."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.url}>"

    def _missing(self, key: str) -> StorageKeyError:
        return StorageKeyError(key, self.where)

    @abstractmethod
    async def _put(self, key: str, data: bytes) -> None: ...

    @abstractmethod
    async def _put_if_absent(self, key: str, data: bytes) -> bool: ...

    @abstractmethod
    async def _get(self, key: str) -> bytes: ...

    @abstractmethod
    async def _exists(self, key: str) -> bool: ...

    @abstractmethod
    async def _list(self, prefix: str) -> list[str]: ...

    @abstractmethod
    async def _delete(self, key: str) -> None: ...

    @abstractmethod
    async def _modified(self, key: str) -> float: ...


def open_storage(url: str | os.PathLike[str], **options: Any) -> Storage:
    """Open the store ``url`` names; ``options`` go to the backend (e.g. ``connection_string``
    for ``az://``)."""
    if isinstance(url, os.PathLike):
        return FileStorage(url, **options)
    if not isinstance(url, str) or not url:
        raise ValueError(f"storage URL must be a non-empty string; supported: {SUPPORTED}")
    parts = urlsplit(url)
    if parts.query or parts.fragment or "@" in parts.netloc:
        # A SAS token or key pasted into the URL would end up in logs: refuse, without echoing it.
        raise ValueError(
            f"storage URL {_safe_url(url)!r} must not carry a query, fragment or user info; "
            "credentials come from the environment"
        )
    scheme = parts.scheme.lower()
    if scheme == "":
        return FileStorage(url, **options)
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise ValueError(f"file storage URL {url!r} names a host; use file:///absolute/path")
        path = unquote(parts.path)
        if not path.startswith("/"):
            raise ValueError(f"file storage URL {url!r} needs an absolute path (file:///...)")
        return FileStorage(path, **options)
    if scheme == "memory":
        return MemoryStorage((parts.netloc + parts.path).strip("/") or "default", **options)
    if scheme == "az":
        return AzureStorage(parts.netloc, unquote(parts.path), **options)
    raise ValueError(
        f"unsupported storage URL scheme {parts.scheme!r} in {_safe_url(url)!r}; "
        f"supported: {SUPPORTED}"
    )


def _safe_url(url: str) -> str:
    """``url`` without user info, query and fragment: the places secrets hide."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return f"{parts.scheme}://{host}{parts.path}" if parts.scheme else parts.path


# --- memory ------------------------------------------------------------------------------
_MEMORY: dict[str, dict[str, tuple[bytes, float]]] = {}
_MEMORY_LOCK = threading.Lock()


class MemoryStorage(Storage):
    """Process-local store for tests; stores opened with the same name share their data."""

    def __init__(self, name: str = "default") -> None:
        self.name = name
        self.url = f"memory://{name}"
        with _MEMORY_LOCK:
            self._items = _MEMORY.setdefault(name, {})

    async def _put(self, key: str, data: bytes) -> None:
        with _MEMORY_LOCK:
            self._items[key] = (data, time.time())

    async def _put_if_absent(self, key: str, data: bytes) -> bool:
        with _MEMORY_LOCK:
            if key in self._items:
                return False
            self._items[key] = (data, time.time())
            return True

    async def _get(self, key: str) -> bytes:
        with _MEMORY_LOCK:
            item = self._items.get(key)
        if item is None:
            raise self._missing(key)
        return item[0]

    async def _exists(self, key: str) -> bool:
        with _MEMORY_LOCK:
            return key in self._items

    async def _list(self, prefix: str) -> list[str]:
        with _MEMORY_LOCK:
            return [k for k in self._items if k.startswith(prefix)]

    async def _delete(self, key: str) -> None:
        with _MEMORY_LOCK:
            self._items.pop(key, None)

    async def _modified(self, key: str) -> float:
        with _MEMORY_LOCK:
            item = self._items.get(key)
        if item is None:
            raise self._missing(key)
        return item[1]


# --- local files -------------------------------------------------------------------------
class FileStorage(Storage):
    """Files under ``root``, one per key; directories are created as needed.

    A write is one blocking routine on aiofiles' executor: temporary file in the target's
    directory, write, fsync, then ``os.replace`` (put) or ``os.link`` (put_if_absent: fails if
    the key exists, atomically, across processes), then fsync the directory. Running it as a
    unit means a cancelled ``put`` still finishes or cleans up: no temporary file is stranded.
    Empty directories are left in place after ``delete``.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).expanduser().absolute()
        self.url = self.root.as_uri()

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*key.split("/"))

    @contextlib.contextmanager
    def _errors(self, op: str, key: str) -> Iterator[None]:
        try:
            yield
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            raise StorageError(
                f"cannot {op} {key!r} in {self.url}: {reason}", self.url, key
            ) from exc

    async def _put(self, key: str, data: bytes) -> None:
        with self._errors("put", key):
            await aiofiles.os.wrap(_write_file)(self._path(key), data, False)

    async def _put_if_absent(self, key: str, data: bytes) -> bool:
        path = self._path(key)
        with self._errors("put", key):
            written = await aiofiles.os.wrap(_write_file)(path, data, True)
            if not written and await aiofiles.os.path.isdir(path):
                raise StorageError(
                    f"cannot put {key!r} in {self.url}: a directory of other keys is in the way",
                    self.url,
                    key,
                )
        return written

    async def _get(self, key: str) -> bytes:
        with self._errors("get", key):
            try:
                async with aiofiles.open(self._path(key), "rb") as f:
                    return await f.read()
            except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
                raise self._missing(key) from None

    async def _exists(self, key: str) -> bool:
        return await aiofiles.os.path.isfile(self._path(key))

    async def _list(self, prefix: str) -> list[str]:
        with self._errors("list", prefix):
            return await aiofiles.os.wrap(self._walk)(prefix)

    def _walk(self, prefix: str) -> list[str]:
        # Start at the deepest directory the prefix names in full; prune what cannot match.
        start = self.root.joinpath(*prefix.split("/")[:-1])
        keys = []
        for dirpath, dirnames, filenames in os.walk(start):
            rel = Path(dirpath).relative_to(self.root).as_posix()
            base = "" if rel == "." else rel + "/"
            dirnames[:] = [
                d
                for d in dirnames
                if (base + d + "/").startswith(prefix) or prefix.startswith(base + d + "/")
            ]
            keys += [
                base + n
                for n in filenames
                if not n.startswith(TEMP_MARK) and (base + n).startswith(prefix)
            ]
        return keys

    async def _delete(self, key: str) -> None:
        with (
            self._errors("delete", key),
            contextlib.suppress(FileNotFoundError, IsADirectoryError, NotADirectoryError),
        ):
            await aiofiles.os.remove(self._path(key))

    async def _modified(self, key: str) -> float:
        with self._errors("stat", key):
            try:
                st = await aiofiles.os.stat(self._path(key))
            except (FileNotFoundError, NotADirectoryError):
                raise self._missing(key) from None
        if not stat.S_ISREG(st.st_mode):
            raise self._missing(key)
        return st.st_mtime


def _write_file(path: Path, data: bytes, exclusive: bool) -> bool:
    """Write ``data`` to ``path`` through a fsynced temporary file. With ``exclusive``, never
    replace an existing file and return False instead."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{TEMP_MARK}{path.name}.{secrets.token_hex(6)}")
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if exclusive:
            try:
                os.link(tmp, path)
            except FileExistsError:
                return False
        else:
            os.replace(tmp, path)
        _fsync_dir(path.parent)
        return True
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _fsync_dir(directory: Path) -> None:
    """Make the rename itself durable (a crash after it must not resurrect the old file)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems cannot fsync a directory; the data itself is synced
        pass
    finally:
        os.close(fd)


# --- Azure Blob Storage ------------------------------------------------------------------
_CONTAINER_NAME = re.compile(r"^(?!.*--)[a-z0-9][a-z0-9-]{1,61}[a-z0-9]$")
_SECRET_FIELDS = re.compile(r"(?i)\b(AccountKey|SharedAccessSignature|sig)=[^;&\s'\"]+")
CREDENTIALS_HELP = (
    "set AZURE_STORAGE_CONNECTION_STRING, or AZURE_STORAGE_ACCOUNT with AZURE_STORAGE_KEY or "
    "AZURE_STORAGE_SAS_TOKEN, or set AZURE_STORAGE_ACCOUNT and install azure-identity to use "
    "DefaultAzureCredential"
)


class AzureStorage(Storage):
    """Blobs named ``prefix/key`` in an Azure Blob Storage container (created when missing).

    Credentials, first found wins: ``connection_string=``; ``AZURE_STORAGE_CONNECTION_STRING``;
    ``AZURE_STORAGE_ACCOUNT`` (or ``account=``) with ``AZURE_STORAGE_KEY`` or
    ``AZURE_STORAGE_SAS_TOKEN`` (or ``credential=``); else ``DefaultAzureCredential`` when
    azure-identity is installed. ``account_url=`` overrides the public endpoint. Other keyword
    arguments go to ``ContainerClient`` (``retry_policy``, ``connection_timeout``,
    ``read_timeout``, ...); the SDK's defaults retry a dead endpoint for about a minute.

    A missing container reads as an empty store; the first write creates it.
    ``put_if_absent`` uploads with ``If-None-Match: *``: the service lets one writer win. If
    the SDK retries an upload whose first try did land, that call may report False although
    its own bytes are stored; either way the stored value is one writer's, whole.
    """

    def __init__(
        self,
        container: str,
        prefix: str = "",
        *,
        connection_string: str | None = None,
        account: str | None = None,
        credential: Any = None,
        account_url: str | None = None,
        **client_options: Any,
    ) -> None:
        from azure.storage.blob.aio import ContainerClient

        if "transport" not in client_options and importlib.util.find_spec("aiohttp") is None:
            # The SDK would only fail at the first request; say so now, with the fix.
            raise StorageError(
                "az:// storage needs aiohttp, the async transport of azure-core: "
                "pip install 'azure-storage-blob[aio]'"
            )
        if not _CONTAINER_NAME.match(container or ""):
            raise ValueError(
                f"invalid Azure container name {container!r}: 3-63 lowercase letters, digits "
                "and single hyphens, starting and ending with a letter or digit"
            )
        prefix = prefix.strip("/")
        if prefix:
            check_key(prefix, "prefix")
        self.container = container
        self.prefix = prefix
        self._base = prefix + "/" if prefix else ""
        self._secrets: list[str] = []
        self._owned_credential: Any = None

        conn = connection_string or os.environ.get("AZURE_STORAGE_CONNECTION_STRING")
        client: ContainerClient
        if conn:
            self._secrets += re.findall(r"(?i)(?:AccountKey|SharedAccessSignature)=([^;]+)", conn)
            try:
                client = ContainerClient.from_connection_string(conn, container, **client_options)
            except ValueError as exc:
                raise StorageError(
                    "invalid Azure storage connection string: " + self._redact(str(exc))
                ) from None
            how = "connection string"
        else:
            account = account or os.environ.get("AZURE_STORAGE_ACCOUNT")
            if not account and not account_url:
                raise StorageError(f"no Azure credentials for az://{container}: {CREDENTIALS_HELP}")
            url = account_url or f"https://{account}.blob.core.windows.net"
            account = account or (urlsplit(url).hostname or "").split(".")[0]
            how = "explicit credential"
            if credential is None:
                credential, how = self._credential_from_env(account)
            client = ContainerClient(url, container, credential=credential, **client_options)
        self._client = client
        self.account = client.account_name or account or "?"
        self._endpoint = _safe_url(client.primary_endpoint)
        self.url = f"az://{container}/{prefix}"
        log.debug("storage opened", store=self.where, endpoint=self._endpoint, credentials=how)

    @property
    def where(self) -> str:
        return f"{self.url} (account {self.account})"

    def _credential_from_env(self, account: str) -> tuple[Any, str]:
        from azure.core.credentials import AzureNamedKeyCredential, AzureSasCredential

        key = os.environ.get("AZURE_STORAGE_KEY")
        if key:
            self._secrets.append(key)
            return AzureNamedKeyCredential(account, key), "account key"
        sas = os.environ.get("AZURE_STORAGE_SAS_TOKEN")
        if sas:
            self._secrets.append(sas.lstrip("?"))
            return AzureSasCredential(sas.lstrip("?")), "SAS token"
        try:
            from azure.identity.aio import DefaultAzureCredential
        except ImportError:
            raise StorageError(
                f"no Azure credentials for account {account!r}: {CREDENTIALS_HELP}"
            ) from None
        self._owned_credential = DefaultAzureCredential()
        return self._owned_credential, "DefaultAzureCredential"

    def _redact(self, text: str) -> str:
        for secret in self._secrets:
            if secret:
                text = text.replace(secret, "***")
        return _SECRET_FIELDS.sub(r"\1=***", text)

    def _fail(self, op: str, key: str, exc: AzureError) -> NoReturn:
        """Raise a StorageError that names store and key; the SDK's error (which may carry
        URLs with signatures) is summarised, redacted, and not chained."""
        from azure.core.exceptions import (
            ClientAuthenticationError,
            HttpResponseError,
            ServiceRequestError,
            ServiceResponseError,
        )

        status = getattr(exc, "status_code", None)
        first_line = (getattr(exc, "message", None) or str(exc)).strip().splitlines() or [""]
        detail = self._redact(f"{type(exc).__name__}: {first_line[0]}")
        cls: type[StorageError] = StorageError
        if isinstance(exc, ServiceRequestError | ServiceResponseError):
            cls, why = StorageUnavailable, f"cannot reach {self._endpoint} ({detail})"
        elif isinstance(exc, HttpResponseError):
            code = getattr(exc, "error_code", None) or ""
            why = f"HTTP {status} {code}".rstrip() + f" ({detail})"
            if status in (408, 429) or (status or 0) >= 500:
                cls = StorageUnavailable
            elif isinstance(exc, ClientAuthenticationError) or status == 403:
                why = "access denied, check the credentials: " + why
        else:
            why = detail
        raise cls(f"cannot {op} {key!r} in {self.where}: {why}", self.where, key) from None

    def _blob(self, key: str) -> Any:
        return self._client.get_blob_client(self._base + key)

    async def _upload(self, key: str, data: bytes, overwrite: bool) -> bool:
        from azure.core.exceptions import (
            AzureError,
            HttpResponseError,
            ResourceExistsError,
            ResourceNotFoundError,
        )

        blob = self._blob(key)
        for attempt in range(2):
            try:
                await blob.upload_blob(data, length=len(data), overwrite=overwrite)
                return True
            except ResourceNotFoundError as exc:
                if attempt or getattr(exc, "error_code", None) != "ContainerNotFound":
                    self._fail("put", key, exc)
                await self._create_container(key)
            except (ResourceExistsError, HttpResponseError) as exc:
                exists = isinstance(exc, ResourceExistsError) or exc.status_code == 412
                if exists and not overwrite:
                    return False
                self._fail("put", key, exc)
            except AzureError as exc:
                self._fail("put", key, exc)
        raise AssertionError("unreachable")

    async def _create_container(self, key: str) -> None:
        from azure.core.exceptions import AzureError, ResourceExistsError

        try:
            await self._client.create_container()
            log.info("storage container created", store=self.where)
        except ResourceExistsError:
            pass
        except AzureError as exc:
            self._fail("create the container for", key, exc)

    async def _put(self, key: str, data: bytes) -> None:
        await self._upload(key, data, overwrite=True)

    async def _put_if_absent(self, key: str, data: bytes) -> bool:
        return await self._upload(key, data, overwrite=False)

    async def _get(self, key: str) -> bytes:
        from azure.core.exceptions import AzureError, ResourceModifiedError, ResourceNotFoundError

        blob = self._blob(key)
        for attempt in range(3):
            try:
                stream = await blob.download_blob()
                return await stream.readall()
            except ResourceNotFoundError:
                raise self._missing(key) from None
            except ResourceModifiedError as exc:  # overwritten between two chunks: read again
                if attempt == 2:
                    self._fail("get", key, exc)
            except AzureError as exc:
                self._fail("get", key, exc)
        raise AssertionError("unreachable")

    async def _exists(self, key: str) -> bool:
        from azure.core.exceptions import AzureError

        try:
            return bool(await self._blob(key).exists())
        except AzureError as exc:
            self._fail("check", key, exc)

    async def _list(self, prefix: str) -> list[str]:
        from azure.core.exceptions import AzureError, ResourceNotFoundError

        keys = []
        try:
            async for props in self._client.list_blobs(name_starts_with=self._base + prefix):
                keys.append(props.name[len(self._base) :])
        except ResourceNotFoundError:
            return []
        except AzureError as exc:
            self._fail("list", prefix, exc)
        return keys

    async def _delete(self, key: str) -> None:
        from azure.core.exceptions import AzureError, ResourceNotFoundError

        try:
            await self._blob(key).delete_blob()
        except ResourceNotFoundError:
            pass
        except AzureError as exc:
            self._fail("delete", key, exc)

    async def _modified(self, key: str) -> float:
        from azure.core.exceptions import AzureError, ResourceNotFoundError

        try:
            props = await self._blob(key).get_blob_properties()
        except ResourceNotFoundError:
            raise self._missing(key) from None
        except AzureError as exc:
            self._fail("stat", key, exc)
        return float(props.last_modified.timestamp())

    async def close(self) -> None:
        await self._client.close()
        if self._owned_credential is not None:
            await self._owned_credential.close()
