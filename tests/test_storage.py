"""The storage layer: one contract over file, memory and Azure (Azurite) backends, atomicity
on disk, racing processes, Azure outages and secrets that must never show."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import time
import traceback
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from azure.storage.blob.aio import LinearRetry
from azurite import ACCOUNT, ACCOUNT_KEY, Azurite, azurite_server, free_port

from odibi_actor.storage import (
    TEMP_MARK,
    AzureStorage,
    FileStorage,
    MemoryStorage,
    Storage,
    StorageError,
    StorageKeyError,
    StorageUnavailable,
    open_storage,
)

pytestmark = pytest.mark.timeout(60)
TESTS = Path(__file__).resolve().parent
MB = 1024 * 1024


def fast_fail() -> dict[str, Any]:
    """Client options that give up on a dead endpoint within seconds, not the SDK's minute."""
    return {
        "retry_policy": LinearRetry(backoff=0.1, random_jitter_range=0, retry_total=1),
        "connection_timeout": 2,
        "read_timeout": 10,
    }


@pytest.fixture(scope="module")
def azurite() -> Iterator[Azurite]:
    yield from azurite_server()


def azure_store(server: Azurite, prefix: str = "pre", **options: Any) -> Storage:
    container = "t" + uuid.uuid4().hex[:16]  # a fresh container per test: no cross-talk
    return open_storage(
        f"az://{container}/{prefix}", connection_string=server.connection_string, **options
    )


@pytest.fixture(params=["file", "memory", "azure"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Storage]:
    if request.param == "file":
        s: Storage = open_storage((tmp_path / "store").as_uri())
    elif request.param == "memory":
        s = open_storage(f"memory://test-{uuid.uuid4().hex}")
    else:
        s = azure_store(request.getfixturevalue("azurite"))
    async with s:
        yield s


# --- the contract, on every backend --------------------------------------------------------
@pytest.mark.timeout(60)
async def test_roundtrip_small_empty_and_10mb(store: Storage) -> None:
    big = os.urandom(10 * MB)
    for key, data in [("small", b"hello"), ("empty", b""), ("dir/big", big)]:
        await store.put(key, data)
        assert await store.get(key) == data, key
    await store.put("view", memoryview(b"abc"))
    assert await store.get("view") == b"abc"
    with pytest.raises(TypeError, match="bytes"):
        await store.put("text", "not bytes")  # type: ignore[arg-type]


@pytest.mark.timeout(30)
async def test_put_overwrites(store: Storage) -> None:
    await store.put("k", b"old value, longer")
    await store.put("k", b"new")
    assert await store.get("k") == b"new"


@pytest.mark.timeout(30)
async def test_missing_key_error_names_key_and_store(store: Storage) -> None:
    with pytest.raises(StorageKeyError) as info:
        await store.get("no/such-key")
    assert isinstance(info.value, KeyError)
    assert info.value.key == "no/such-key"
    assert "'no/such-key'" in str(info.value)
    assert store.url in str(info.value)
    with pytest.raises(StorageKeyError, match="no/such-key"):
        await store.modified("no/such-key")


@pytest.mark.timeout(30)
async def test_exists(store: Storage) -> None:
    assert not await store.exists("a/b")
    await store.put("a/b", b"x")
    assert await store.exists("a/b")
    assert not await store.exists("a")  # a "directory" of keys is not a key


@pytest.mark.timeout(30)
async def test_list_is_sorted_and_bounded_by_prefix(store: Storage) -> None:
    keys = ["b", "a/2", "a/1", "a/sub/x", "ab", "c/a", "a.txt"]
    for k in keys:
        await store.put(k, k.encode())
    assert await store.list() == sorted(keys)
    assert await store.list("a/") == ["a/1", "a/2", "a/sub/x"]
    assert await store.list("a/sub/") == ["a/sub/x"]
    assert await store.list("a") == ["a.txt", "a/1", "a/2", "a/sub/x", "ab"]  # string prefix
    assert await store.list("a/s") == ["a/sub/x"]
    assert await store.list("zz") == []
    assert await store.list("zz/") == []


@pytest.mark.timeout(30)
async def test_delete_is_idempotent(store: Storage) -> None:
    await store.put("gone/soon", b"x")
    await store.put("gone/stays", b"y")
    await store.delete("gone/soon")
    await store.delete("gone/soon")
    await store.delete("never/was")
    assert not await store.exists("gone/soon")
    assert await store.list("gone/") == ["gone/stays"]


@pytest.mark.timeout(30)
async def test_put_if_absent_never_overwrites(store: Storage) -> None:
    assert await store.put_if_absent("c/k", b"first") is True
    assert await store.put_if_absent("c/k", b"second") is False
    assert await store.get("c/k") == b"first"
    await store.delete("c/k")
    assert await store.put_if_absent("c/k", b"") is True
    assert await store.get("c/k") == b""


@pytest.mark.timeout(30)
async def test_modified_is_epoch_seconds_and_grows(store: Storage) -> None:
    await store.put("m", b"1")
    first = await store.modified("m")
    assert abs(first - time.time()) < 5
    # Azure's Last-Modified has one-second resolution; file times are finer.
    await asyncio.sleep(1.1 if isinstance(store, AzureStorage) else 0.05)
    await store.put("m", b"2")
    assert await store.modified("m") > first


BAD_KEYS = ["", "/abs", "/", "a/../b", "..", "../up", "a\\b", "a//b", "a/", "./a", "a\x00b"]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("key", BAD_KEYS)
async def test_bad_keys_rejected(store: Storage, key: str) -> None:
    calls: list[Callable[[], Awaitable[object]]] = [
        lambda: store.put(key, b"x"),
        lambda: store.put_if_absent(key, b"x"),
        lambda: store.get(key),
        lambda: store.exists(key),
        lambda: store.delete(key),
        lambda: store.modified(key),
    ]
    for call in calls:
        with pytest.raises(ValueError) as info:
            await call()
        assert repr(key) in str(info.value)
    assert await store.list() == []


@pytest.mark.timeout(30)
async def test_bad_prefixes_rejected(store: Storage) -> None:
    for prefix in ["/abs", "a/../b", "..", "../", "a\\b", "a//b", "./a"]:
        with pytest.raises(ValueError, match="prefix") as info:
            await store.list(prefix)
        assert repr(prefix.rstrip("/") or prefix) in str(info.value) or repr(prefix) in str(
            info.value
        )


@pytest.mark.timeout(30)
async def test_temp_file_names_are_reserved(store: Storage) -> None:
    with pytest.raises(ValueError, match="reserved"):
        await store.put(f"a/{TEMP_MARK}x", b"x")


# --- open_storage ------------------------------------------------------------------------
@pytest.mark.timeout(30)
async def test_open_storage_urls(tmp_path: Path) -> None:
    s = open_storage(tmp_path.as_uri())
    assert isinstance(s, FileStorage) and s.root == tmp_path
    assert isinstance(open_storage(str(tmp_path / "plain")), FileStorage)
    assert isinstance(open_storage(tmp_path / "pathlike"), FileStorage)
    a, b = open_storage("memory://shared"), open_storage("memory://shared")
    assert isinstance(a, MemoryStorage)
    await a.put("k", b"v")
    assert await b.get("k") == b"v"
    assert not await open_storage("memory://other").exists("k")


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("url", "match"),
    [
        ("s3://bucket/x", r"unsupported storage URL scheme 's3'.*file:///.*memory://.*az://"),
        ("file://host/path", "names a host"),
        ("", "non-empty"),
        ("az://Bad_Name/x", "invalid Azure container name"),
        ("az://ok-container/../x", "invalid storage prefix"),
    ],
)
def test_open_storage_rejects(url: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        open_storage(url, connection_string="UseDevelopmentStorage=true")


@pytest.mark.timeout(30)
def test_url_with_credentials_is_refused_without_echoing_them() -> None:
    for url in ["az://c0ntainer/p?sig=SECRETSIG", "https://user:SECRETPW@host/x?sig=SECRETSIG"]:
        with pytest.raises(ValueError) as info:
            open_storage(url)
        assert "SECRET" not in str(info.value)


@pytest.mark.timeout(30)
def test_azure_without_credentials_says_what_to_set(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("AZURE_STORAGE_CONNECTION_STRING", "AZURE_STORAGE_ACCOUNT"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(StorageError, match=r"AZURE_STORAGE_CONNECTION_STRING.*AZURE_STORAGE_KEY"):
        open_storage("az://container/prefix")
    monkeypatch.setenv("AZURE_STORAGE_ACCOUNT", "someaccount")
    monkeypatch.delenv("AZURE_STORAGE_KEY", raising=False)
    monkeypatch.delenv("AZURE_STORAGE_SAS_TOKEN", raising=False)
    monkeypatch.setitem(sys.modules, "azure.identity.aio", None)  # as if not installed
    with pytest.raises(StorageError, match=r"someaccount.*azure-identity"):
        open_storage("az://container/prefix")


# --- file backend ------------------------------------------------------------------------
def temp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.startswith(TEMP_MARK)]


@pytest.mark.timeout(60)
async def test_file_reader_never_sees_a_partial_value(tmp_path: Path) -> None:
    store = open_storage(tmp_path)
    values = [b"a" * MB, b"b" * (3 * MB), b"c" * 10]
    await store.put("hot", values[0])
    done = asyncio.Event()
    seen: list[int] = []

    async def writer() -> None:
        for i in range(150):
            await store.put("hot", values[i % 3])
        done.set()

    async def reader() -> None:
        while not done.is_set():
            data = await store.get("hot")
            assert data in values, f"partial read of {len(data)} bytes"
            seen.append(len(data))

    await asyncio.gather(writer(), reader(), reader())
    assert len(seen) > 20 and len(set(seen)) > 1, "the readers should have overlapped the writes"
    assert temp_files(tmp_path) == []


@pytest.mark.timeout(60)
async def test_file_leaves_no_temp_files(tmp_path: Path) -> None:
    store = open_storage(tmp_path)
    for i in range(20):
        await store.put(f"d/{i}", b"x" * i)
        await store.put_if_absent(f"d/{i}", b"loser")  # loses: its temp file must go too
    await store.put("blocker", b"a file where a directory should be")
    with pytest.raises(StorageError, match="blocker/x"):
        await store.put("blocker/x", b"y")
    await store.put("a/b", b"1")
    with pytest.raises(StorageError, match="directory"):
        await store.put_if_absent("a", b"2")
    with pytest.raises(StorageError):
        await store.put("a", b"2")
    # A cancelled put still finishes (or cleans up) in its thread: no stranded temp file.
    task = asyncio.create_task(store.put("cancelled", os.urandom(20 * MB)))
    await asyncio.sleep(0.01)
    task.cancel()
    deadline = time.monotonic() + 10
    while temp_files(tmp_path) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert temp_files(tmp_path) == []
    assert "cancelled" not in await store.list("d/")
    assert all(p.resolve().is_relative_to(tmp_path) for p in tmp_path.rglob("*"))


# --- racing processes ----------------------------------------------------------------------
ROUNDS = 50
RACER = """
import asyncio, json, os, sys, time
from test_storage import payload
from odibi_actor.storage import open_storage

async def main(url, tag):
    options = {}
    if os.environ.get("RACE_CONNECTION_STRING"):
        options["connection_string"] = os.environ["RACE_CONNECTION_STRING"]
    async with open_storage(url, **options) as store:
        await store.exists("warm-up")  # connect before the start signal
        print("ready", flush=True)
        start = float(sys.stdin.readline())
        won = []
        for i in range(int(sys.argv[3])):
            # Both racers start key i at the same wall-clock instant, so their writes overlap.
            await asyncio.sleep(max(0.0, start + i * 0.02 - time.time()))
            won.append(await store.put_if_absent(f"race/{i}", payload(tag, i)))
    print(json.dumps(won), flush=True)

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


def payload(tag: str, i: int) -> bytes:
    """Distinct per racer and key, and of different sizes, so a mix-up or a torn write shows."""
    size = (200_000 if tag == "A" else 300_000) + i
    return (f"{tag}:{i}:".encode() * (size // 4 + 1))[:size]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("backend", ["file", "azure"])
async def test_two_processes_race_put_if_absent(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    path = os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path}
    if backend == "file":
        url = (tmp_path / "race").as_uri()
    else:
        server = request.getfixturevalue("azurite")
        url = f"az://race{uuid.uuid4().hex[:12]}/cache"
        env["RACE_CONNECTION_STRING"] = server.connection_string
    procs = {
        tag: subprocess.Popen(
            [sys.executable, "-c", RACER, url, tag, str(ROUNDS)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            text=True,
        )
        for tag in "AB"
    }
    try:
        for tag, proc in procs.items():
            assert proc.stdout is not None and proc.stdout.readline().strip() == "ready", tag
        start = time.time() + 0.2
        for proc in procs.values():
            assert proc.stdin is not None
            proc.stdin.write(f"{start}\n")
            proc.stdin.flush()
        results = {}
        for tag, proc in procs.items():
            out, _ = await asyncio.to_thread(proc.communicate, timeout=90)
            assert proc.returncode == 0, f"racer {tag} failed"
            results[tag] = json.loads(out.strip().splitlines()[-1])
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    opts = {"connection_string": env["RACE_CONNECTION_STRING"]} if backend == "azure" else {}
    async with open_storage(url, **opts) as store:
        assert await store.list("race/") == sorted(f"race/{i}" for i in range(ROUNDS))
        for i in range(ROUNDS):
            a, b = results["A"][i], results["B"][i]
            assert a != b, f"race/{i}: exactly one racer must win, got A={a} B={b}"
            assert await store.get(f"race/{i}") == payload("A" if a else "B", i), f"race/{i}"
    if backend == "file":
        assert temp_files(tmp_path) == []


# --- Azure: credentials, outages, secrets ----------------------------------------------------
@pytest.mark.timeout(60)
async def test_azure_account_key_and_sas_from_environment(
    azurite: Azurite, monkeypatch: pytest.MonkeyPatch
) -> None:
    from azure.storage.blob import AccountSasPermissions, ResourceTypes, generate_account_sas

    monkeypatch.delenv("AZURE_STORAGE_CONNECTION_STRING", raising=False)
    monkeypatch.setenv("AZURE_STORAGE_ACCOUNT", ACCOUNT)
    monkeypatch.setenv("AZURE_STORAGE_KEY", ACCOUNT_KEY)
    endpoint = f"http://127.0.0.1:{azurite.port}/{ACCOUNT}"
    async with open_storage("az://fromkey/p", account_url=endpoint) as store:
        await store.put("k", b"by key")
        assert await store.get("k") == b"by key"

    sas = generate_account_sas(
        ACCOUNT,
        ACCOUNT_KEY,
        ResourceTypes(service=True, container=True, object=True),
        AccountSasPermissions(read=True, write=True, delete=True, list=True, create=True),
        expiry=time.time() + 3600,
    )
    monkeypatch.delenv("AZURE_STORAGE_KEY")
    monkeypatch.setenv("AZURE_STORAGE_SAS_TOKEN", "?" + sas)
    async with open_storage("az://fromkey/p", account_url=endpoint) as store:
        assert await store.get("k") == b"by key"
        assert await store.put_if_absent("k2", b"by sas") is True
        with pytest.raises(StorageKeyError):
            await store.get("missing")


@pytest.mark.timeout(90)
async def test_azure_outage_raises_unavailable_fast_then_recovers() -> None:
    server_iter = azurite_server()
    server = next(server_iter)
    try:
        async with azure_store(server, **fast_fail()) as store:
            await store.put("k", b"before")
            server.stop()
            ops: dict[str, Callable[[], Awaitable[object]]] = {
                "get": lambda: store.get("k"),
                "put": lambda: store.put("k", b"during"),
                "put_if_absent": lambda: store.put_if_absent("k2", b"during"),
                "exists": lambda: store.exists("k"),
                "list": lambda: store.list("k"),
                "delete": lambda: store.delete("k"),
                "modified": lambda: store.modified("k"),
            }
            for name, op in ops.items():
                started = time.monotonic()
                with pytest.raises(StorageUnavailable) as info:
                    await op()
                assert time.monotonic() - started < 10, f"{name} took too long to give up"
                assert not isinstance(info.value, KeyError), name
                assert "'k" in str(info.value) and store.url in str(info.value), name
                assert ACCOUNT_KEY not in str(info.value)
            server.start()  # same port, empty (in-memory): the container comes back on write
            assert not await store.exists("k")
            await store.put("k", b"after")
            assert await store.get("k") == b"after"
            assert await store.put_if_absent("k", b"again") is False
    finally:
        server_iter.close()


def all_text(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc)) + repr(exc) + str(exc)


@pytest.mark.timeout(90)
async def test_azure_secrets_never_in_errors_or_logs(
    azurite: Azurite, caplog: pytest.LogCaptureFixture
) -> None:
    wrong_key = "V3JvbmdLZXlXcm9uZ0tleVdyb25nS2V5V3JvbmdLZXlXcm9uZ0tleVdyb25nS2V5"
    errors: list[BaseException] = []
    caplog.set_level(logging.DEBUG)
    with structlog.testing.capture_logs() as events:
        good = azure_store(azurite, logging_enable=True)  # the SDK logs every request
        async with good:
            await good.put("k", b"v")
            for call in (lambda: good.get("missing"), lambda: good.put("/abs", b"")):
                try:
                    await call()
                except Exception as exc:
                    errors.append(exc)
        dead = f"BlobEndpoint=http://127.0.0.1:{free_port()}/{ACCOUNT};"
        for conn in (
            azurite.connection_string.replace(ACCOUNT_KEY, wrong_key),  # -> 403
            f"AccountName={ACCOUNT};AccountKey={ACCOUNT_KEY};{dead}",  # -> unavailable
            f"AccountKey={ACCOUNT_KEY};NoEndpoint=1",  # -> invalid connection string
        ):
            try:
                async with open_storage(
                    "az://secrets/p", connection_string=conn, logging_enable=True, **fast_fail()
                ) as bad:
                    await bad.put("k", b"v")
            except Exception as exc:
                errors.append(exc)
    kinds = [type(e).__name__ for e in errors]
    assert kinds == [
        "StorageKeyError",
        "ValueError",
        "StorageError",
        "StorageUnavailable",
        "StorageError",
    ], kinds
    assert "access denied" in str(errors[2])
    logs = caplog.text + repr(events)
    assert "devstoreaccount1" in caplog.text, "the SDK's request log should have been captured"
    for secret in (ACCOUNT_KEY, wrong_key):
        assert secret not in logs
        for exc in errors:
            assert secret not in all_text(exc), type(exc).__name__
