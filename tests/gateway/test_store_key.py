"""`store_key`: stored requests and answers sealed with AES-256-GCM (issue 10: `Authorization`,
`Cookie` and `Proxy-Authorization` were kept in plain text for `retention`)."""

from __future__ import annotations

import asyncio
import base64
import sqlite3
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web

from gateway.app import Gateway
from gateway.config import ConfigError, parse_settings
from gateway.errors import StoreError
from gateway.store.sealing import Sealer, StoreKeyError
from tests.conftest import GatewayFactory, UpstreamFactory, settings_for

KEY = bytes(range(32))
OTHER = bytes(range(1, 33))
SECRETS = (
    b"Bearer sk-live-0123456789",
    b"session=cookie-0123456789",
    b"card=4111111111111111",
    b"answer-0123456789",
    b"q=query-0123456789",
)


def key_text(key: bytes) -> str:
    return base64.b64encode(key).decode()


@pytest.fixture
def with_key(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    monkeypatch.setenv("STEPGATE_STORE_KEY", key_text(KEY))
    return {"store_key": "env:STEPGATE_STORE_KEY"}


class Service:
    """Fails the first invocation (so the second is replayed from the store), then answers."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, dict[str, str], bytes]] = []

    def app(self) -> web.Application:
        async def handle(request: web.Request) -> web.Response:
            self.seen.append((request.path_qs, dict(request.headers), await request.read()))
            if len(self.seen) == 1:
                return web.Response(status=503)
            return web.Response(body=b"answer-0123456789", headers={"X-Answer": "yes"})

        app = web.Application()
        app.router.add_route("*", "/work", handle)
        return app


def route(base: str) -> dict[str, Any]:
    return {
        "name": "work",
        "path": "/work",
        "upstream": base,
        "durable": True,
        "retry": {"attempts": 3, "initial": "10ms", "max": "20ms"},
    }


def file_bytes(db: Path) -> bytes:
    return b"".join(path.read_bytes() for path in sorted(db.parent.glob(db.name + "*")))


async def send(gw: Any, idempotency_key: str | None = None) -> str:
    headers = {"Authorization": "Bearer sk-live-0123456789", "Cookie": "session=cookie-0123456789"}
    if idempotency_key is not None:
        headers["Idempotency-Key"] = idempotency_key
    async with gw.session.post(
        gw.url + "/work?q=query-0123456789",
        data=b"card=4111111111111111",
        headers=headers,
    ) as resp:
        assert resp.status == 200
        assert await resp.read() == b"answer-0123456789"
        assert resp.headers["X-Answer"] == "yes"
        return resp.headers["Stepgate-Run-Id"]


# --- the store holds no secret in plain text ----------------------------------------------


async def test_without_a_key_the_store_is_plain_as_before(
    gateway: GatewayFactory, upstream: UpstreamFactory, tmp_path: Path
) -> None:
    service = Service()
    gw = await gateway([route(await upstream(service.app()))])
    await send(gw)
    stored = file_bytes(tmp_path / "stepgate.db")
    assert all(secret in stored for secret in SECRETS)


async def test_with_a_key_no_secret_is_stored_in_plain_text_and_the_run_replays(
    gateway: GatewayFactory,
    upstream: UpstreamFactory,
    tmp_path: Path,
    with_key: dict[str, str],
) -> None:
    service = Service()
    gw = await gateway([route(await upstream(service.app()))], **with_key)
    run_id = await send(gw, idempotency_key="order-1")
    # The second invocation was replayed from the sealed record, byte for byte.
    assert len(service.seen) == 2
    first, second = service.seen
    assert first[0] == second[0] == "/work?q=query-0123456789"
    assert first[2] == second[2] == b"card=4111111111111111"
    for name in ("Authorization", "Cookie"):
        assert first[1][name] == second[1][name]
    run = await gw.store.get_run(run_id)
    stored = file_bytes(tmp_path / "stepgate.db")
    for secret in (*SECRETS, run.request_hash.encode()):
        assert secret not in stored
    # The same request with the same key attaches to the run: its hash opened and matched.
    assert await send(gw, idempotency_key="order-1") == run_id
    assert len(service.seen) == 2
    # The store reads it back whole, and so does a poll of the ended run.
    run = await gw.store.get_run(run_id)
    assert run.body == b"card=4111111111111111" and run.target == "/work?q=query-0123456789"
    assert ("Authorization", "Bearer sk-live-0123456789") in run.headers
    assert run.resp_body == b"answer-0123456789"
    async with gw.session.get(gw.url + f"/_stepgate/runs/{run_id}?token={run.poll_token}") as resp:
        assert resp.status == 200 and await resp.read() == b"answer-0123456789"


async def test_a_parked_sealed_run_resumes_after_a_restart(
    gateway: GatewayFactory, upstream: UpstreamFactory, with_key: dict[str, str]
) -> None:
    service = Service()
    base = await upstream(service.app())
    slow = {**route(base), "hold": "50ms", "retry": {"attempts": 3, "initial": "1s", "max": "1s"}}
    first = await gateway([slow], **with_key)
    async with first.session.post(
        first.url + "/work?q=query-0123456789",
        data=b"card=4111111111111111",
        headers={"Authorization": "Bearer sk-live-0123456789"},
        allow_redirects=False,
    ) as resp:
        assert resp.status == 303
        location = resp.headers["Location"]
    await first.gateway.stop()  # the run waits in the store, sealed, for its retry
    again = await gateway([slow], **with_key)
    async with again.session.get(again.url + location + "&wait=10") as resp:
        assert resp.status == 200 and await resp.read() == b"answer-0123456789"
    assert [seen[0] for seen in service.seen] == ["/work?q=query-0123456789"] * 2
    assert service.seen[1][1]["Authorization"] == "Bearer sk-live-0123456789"
    assert service.seen[1][2] == b"card=4111111111111111"


async def test_a_sealed_value_moved_to_another_run_does_not_open(
    gateway: GatewayFactory,
    upstream: UpstreamFactory,
    tmp_path: Path,
    with_key: dict[str, str],
) -> None:
    """A changed row is named, not served: it reads as unreadable, its admin page and the
    list still answer, its poll is a problem, and the other runs are untouched."""
    service = Service()
    gw = await gateway([route(await upstream(service.app()))], **with_key)
    first, second, third = await send(gw), await send(gw), await send(gw)
    with sqlite3.connect(tmp_path / "stepgate.db") as conn:
        conn.execute(
            "UPDATE runs SET body = (SELECT body FROM runs WHERE id = ?) WHERE id = ?",
            (first, second),
        )
        # And within one run, a value put in another field.
        conn.execute("UPDATE runs SET resp_body = headers WHERE id = ?", (first,))
    assert (await gw.store.get_run(first)).unreadable == ("resp_body",)
    assert (await gw.store.get_run(second)).unreadable == ("body",)
    assert (await gw.store.get_run(third)).unreadable == ()
    async with gw.session.get(gw.internal + f"/v1/runs/{second}") as resp:
        assert resp.status == 200
        assert (await resp.json())["unreadable"] == ["body"]
    async with gw.session.get(gw.internal + "/v1/runs") as resp:
        assert resp.status == 200
        assert {first, second, third} <= {run["id"] for run in (await resp.json())["runs"]}
    run = await gw.store.get_run(first)
    async with gw.session.get(gw.url + f"/_stepgate/runs/{first}?token={run.poll_token}") as resp:
        assert resp.status == 500
        assert resp.content_type == "application/problem+json"
        assert "does not open with the store_key" in (await resp.json())["detail"]


async def test_a_run_whose_sealed_request_was_changed_fails_instead_of_replaying(
    gateway: GatewayFactory,
    upstream: UpstreamFactory,
    tmp_path: Path,
    with_key: dict[str, str],
) -> None:
    """A parked run whose stored request no longer opens cannot be replayed; the restart
    still comes up, and the run ends failed saying why, without calling the service."""
    service = Service()
    base = await upstream(service.app())
    slow = {**route(base), "hold": "50ms", "retry": {"attempts": 3, "initial": "1s", "max": "1s"}}
    first = await gateway([slow], **with_key)
    async with first.session.post(
        first.url + "/work", data=b"card=4111111111111111", allow_redirects=False
    ) as resp:
        assert resp.status == 303
        location = resp.headers["Location"]
    run_id = resp.headers["Stepgate-Run-Id"]
    await first.gateway.stop()
    with sqlite3.connect(tmp_path / "stepgate.db") as conn:
        # One bit of the ciphertext flipped: the tag no longer matches.
        (headers,) = conn.execute("SELECT headers FROM runs WHERE id = ?", (run_id,)).fetchone()
        changed = headers[:20] + bytes([headers[20] ^ 1]) + headers[21:]
        conn.execute("UPDATE runs SET headers = ? WHERE id = ?", (changed, run_id))
    conn.close()
    again = await gateway([slow], **with_key)
    async with again.session.get(again.url + location + "&wait=10") as resp:
        assert resp.status == 502
        assert "cannot be replayed" in (await resp.json())["detail"]
    assert len(service.seen) == 1  # only the first attempt, before the change
    async with again.session.get(again.internal + "/readyz") as resp:
        assert resp.status == 200


async def test_runs_stored_before_the_key_stay_readable(
    gateway: GatewayFactory,
    upstream: UpstreamFactory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    service = Service()
    base = await upstream(service.app())
    plain = await gateway([route(base)])
    old = await send(plain)
    await plain.gateway.stop()
    monkeypatch.setenv("STEPGATE_STORE_KEY", key_text(KEY))
    gw = await gateway([route(base)], store_key="env:STEPGATE_STORE_KEY")
    new = await send(gw)
    assert (await gw.store.get_run(old)).body == b"card=4111111111111111"
    assert (await gw.store.get_run(new)).body == b"card=4111111111111111"
    with sqlite3.connect(tmp_path / "stepgate.db") as conn:
        raw = dict(conn.execute("SELECT id, body FROM runs"))
    assert raw[old] == b"card=4111111111111111" and raw[new] != raw[old]


# --- the key at start -------------------------------------------------------------------------


async def test_a_wrong_key_stops_the_gateway_before_it_serves(
    gateway: GatewayFactory,
    upstream: UpstreamFactory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    with_key: dict[str, str],
) -> None:
    gw = await gateway([route(await upstream(Service().app()))], **with_key)
    await send(gw)
    await gw.gateway.stop()
    monkeypatch.setenv("STEPGATE_STORE_KEY", key_text(OTHER))
    other = Gateway(
        settings_for(tmp_path / "stepgate.db", [route("http://127.0.0.1:9")], **with_key)
    )
    with pytest.raises(StoreKeyError, match="does not open the store"):
        await other.start()
    await other.stop()
    # Without a key, the sealed runs can't be read either.
    bare = Gateway(settings_for(tmp_path / "stepgate.db", [route("http://127.0.0.1:9")]))
    with pytest.raises(StoreKeyError, match="sealed with a store_key"):
        await bare.start()
    await bare.stop()


async def test_a_key_dropped_once_no_sealed_run_is_left_is_forgotten(
    gateway: GatewayFactory, tmp_path: Path, with_key: dict[str, str]
) -> None:
    gw = await gateway([route("http://127.0.0.1:9")], **with_key)
    await gw.gateway.stop()
    bare = await gateway([route("http://127.0.0.1:9")])
    await bare.gateway.stop()
    with sqlite3.connect(tmp_path / "stepgate.db") as conn:
        assert conn.execute("SELECT count(*) FROM meta").fetchone() == (0,)


async def test_serve_with_a_wrong_key_exits_2_with_one_clear_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = tmp_path / "stepgate.db"
    monkeypatch.setenv("STEPGATE_STORE_KEY", key_text(OTHER))
    sealed = Gateway(
        settings_for(db, [route("http://127.0.0.1:9")], store_key="env:STEPGATE_STORE_KEY")
    )
    await sealed.start()  # the store now knows the other key
    await sealed.stop()
    key_file = tmp_path / "key"
    key_file.write_text(key_text(KEY) + "\n")
    config = tmp_path / "gw.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "listen": "127.0.0.1:0",
                "internal_listen": "127.0.0.1:0",
                "store": f"sqlite:///{db}",
                "store_key": f"file:{key_file}",
                "routes": [route("http://127.0.0.1:9")],
            }
        )
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway",
        "serve",
        "--config",
        str(config),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    stdout, stderr = out.decode(), err.decode()
    assert proc.returncode == 2, stderr
    assert stderr.strip().splitlines() == [
        f"stepgate: the store_key (file:{key_file}) does not open the store {db}: "
        "it was sealed with another key"
    ]
    assert key_text(KEY) not in stderr + stdout


# --- config -----------------------------------------------------------------------------------


def parse(value: object) -> Any:
    return parse_settings({"store_key": value, "routes": []}, source="gw.yaml")


@pytest.mark.parametrize(
    "text",
    [
        key_text(KEY),
        base64.urlsafe_b64encode(KEY).decode().rstrip("="),
        KEY.hex(),
        "  " + KEY.hex().upper() + "\n",
    ],
    ids=["base64", "urlsafe-unpadded", "hex", "hex-upper-spaced"],
)
def test_the_key_is_read_from_the_environment_or_a_file(
    text: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GW_KEY", text)
    (tmp_path / "key").write_text(text)
    for value in ("env:GW_KEY", f"file:{tmp_path / 'key'}"):
        settings = parse(value)
        assert settings.store_key.secret == KEY
        assert settings.store_key.source == value
        assert KEY.hex() not in repr(settings) and str(KEY) not in repr(settings)
    assert parse(None).store_key is None


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (
            key_text(KEY),
            "expected env:NAME or file:PATH (the key itself never goes in the config file)",
        ),
        ("env:", "env: needs an environment variable name"),
        ("env:GW_UNSET_KEY", "the environment variable GW_UNSET_KEY is not set"),
        (
            "env:GW_SHORT_KEY",
            "the environment variable GW_SHORT_KEY does not hold a key: "
            "expected 32 random bytes in base64 or hex",
        ),
        ("file:", "file: needs a path"),
        ("file:/nonexistent/stepgate.key", '"/nonexistent/stepgate.key": file not found'),
        (32, "expected env:NAME or file:PATH, got int"),
    ],
)
def test_a_bad_store_key_names_its_key_and_never_echoes_a_secret(
    value: object, message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("GW_UNSET_KEY", raising=False)
    monkeypatch.setenv("GW_SHORT_KEY", base64.b64encode(b"x" * 16).decode())
    with pytest.raises(ConfigError) as caught:
        parse(value)
    assert caught.value.key == "store_key"
    assert str(caught.value).startswith("gw.yaml: store_key: ")
    assert message in str(caught.value)
    assert key_text(KEY) not in str(caught.value)
    assert base64.b64encode(b"x" * 16).decode() not in str(caught.value)


def test_a_key_file_with_other_content_is_refused(tmp_path: Path) -> None:
    (tmp_path / "key").write_bytes(b"\xff" * 32)
    with pytest.raises(ConfigError, match="does not hold a key"):
        parse(f"file:{tmp_path / 'key'}")
    with pytest.raises(ConfigError, match="is a directory"):
        parse(f"file:{tmp_path}")


# --- the seal itself (no store) -----------------------------------------------------------


def test_each_value_gets_its_own_nonce_and_opens_only_where_it_was_sealed() -> None:
    sealer = Sealer(KEY)
    one, two = sealer.seal("run-a", "body", b"x"), sealer.seal("run-a", "body", b"x")
    assert one != two and len(one) == 1 + 12 + 1 + 16
    assert sealer.open("run-a", "body", one) == b"x"
    for run_id, column, value in (
        ("run-b", "body", one),
        ("run-a", "headers", one),
        ("run-a", "body", one[:-1] + bytes([one[-1] ^ 1])),
        ("run-a", "body", b""),
    ):
        with pytest.raises(StoreError, match="does not open"):
            sealer.open(run_id, column, value)
    with pytest.raises(StoreError):
        Sealer(OTHER).open("run-a", "body", one)
    assert Sealer(KEY).matches(sealer.check_value())
    assert not Sealer(OTHER).matches(sealer.check_value())
