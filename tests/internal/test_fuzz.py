"""Hypothesis against every JSON body the internal listener takes: a step PUT of each kind, an
event, the admin POSTs and the run list's query. Whatever comes in, the answer is never a 5xx
(a refusal is a 4xx problem+json), and the run's admin page and step list still answer 200.

One gateway per test, one held run for all of a test's examples. Hypothesis runs in a thread
over http.client while the gateway keeps the event loop."""

from __future__ import annotations

import asyncio
import http.client
import json
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.internal.conftest import Answer, HeldRun, SyncClient

# Each test that starts a gateway runs on an SQLite file, then on PostgreSQL (tests/conftest.py).
BOTH_DIALECTS = True

EXAMPLES = 200
fuzz = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# -- JSON text, hostile where it can be -----------------------------------------------------------

# Any code point, lone surrogates and the characters JSON must escape included.
chars = st.one_of(
    st.characters(codec=None, exclude_categories=()),
    st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF),
    st.sampled_from('\x00"\\/\u2028\ufeff\x7f'),
)
texts = st.text(chars, max_size=12)


def _dump(value: Any) -> str:
    """JSON text as a careless client writes it: NaN and Infinity pass, a lone surrogate is
    escaped as \\udXXX."""
    return json.dumps(value, allow_nan=True)


numbers = st.one_of(
    st.integers(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(),  # NaN and the infinities come out as NaN, Infinity
    st.sampled_from(
        [
            "1e400",
            "-1e400",
            "1e308",
            "5e-324",
            "-0",
            "0.0e0",
            "1E2",
            "1" + "0" * 4299,
            "1" + "0" * 4300,
            "-" + "9" * 5000,
        ]
    ),
)
number_texts = numbers.map(lambda n: n if isinstance(n, str) else _dump(n))
scalars = st.one_of(st.none().map(_dump), st.booleans().map(_dump), number_texts, texts.map(_dump))


def _array(items: list[str]) -> str:
    return "[" + ",".join(items) + "]"


def _object(members: list[tuple[str, str]]) -> str:
    return "{" + ",".join(f"{_dump(k)}:{v}" for k, v in members) + "}"


values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4).map(_array),
        st.lists(st.tuples(texts, inner), max_size=4).map(_object),
    ),
    max_leaves=16,
)


def _deep(case: tuple[int, str]) -> str:
    depth, kind = case
    return ("[" * depth + "]" * depth) if kind == "[" else ('{"a":' * depth + "1" + "}" * depth)


deep = st.tuples(st.integers(1, 3000) | st.integers(120, 136), st.sampled_from("[{")).map(_deep)
# The values the bodies below carry: mostly hostile JSON, sometimes absurdly deep.
json_texts = st.one_of(values, values, values, deep)


def members(fields: dict[str, st.SearchStrategy[str]]) -> st.SearchStrategy[str]:
    """An object with any subset of `fields` (each value a JSON text), sometimes a stray one."""
    chosen = st.fixed_dictionaries({}, optional=fields)
    extra = st.lists(st.tuples(texts, json_texts), max_size=1)
    return st.tuples(chosen, extra).map(lambda t: _object([*t[0].items(), *t[1]]))


def either(*kinds: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    """A well-typed text for a field, or any JSON at all."""
    return st.one_of(*kinds, json_texts)


seqs = either(
    st.integers(-5, 2**64).map(str),
    st.sampled_from(["2147483647", "2147483648", "9223372036854775808"]),
)
durations = st.tuples(
    st.sampled_from(
        ["0", "1", "1.5", "366", "367", "1e400", "9" * 30, "9" * 1_000_001, "-1", "", "nan"]
    ),
    st.sampled_from(["ms", "s", "m", "h", "d", "", "y", " s"]),
).map(lambda t: _dump(t[0] + t[1]))
timestamps = st.one_of(
    st.datetimes(timezones=st.timezones()).map(lambda d: _dump(d.isoformat())),
    st.datetimes().map(lambda d: _dump(d.isoformat() + "Z")),
    st.sampled_from(
        [
            "9999-12-31T23:59:59Z",
            "0001-01-01T00:00:00+01:00",
            "1970-01-01T00:00Z",
            "2024-02-30T00:00:00Z",
            "now",
            "",
            "9999-12-31T23:59:59-23:59",
        ]
    ).map(_dump),
)

output_bodies = members({"output": json_texts, "seq": seqs})
error_bodies = members(
    {
        "error": either(
            members(
                {
                    "message": either(texts.map(_dump)),
                    "type": either(texts.map(_dump)),
                    "retriable": either(st.booleans().map(_dump)),
                }
            )
        ),
        "seq": seqs,
    }
)
sleep_bodies = members({"sleep": either(members({"until": either(timestamps)})), "seq": seqs})
match_objects = st.lists(st.tuples(texts, json_texts), max_size=3).map(_object)
wait_bodies = members(
    {
        "wait": either(
            members(
                {
                    "event": either(texts.map(_dump)),
                    "match": either(match_objects),
                    "timeout": either(durations, number_texts),
                }
            )
        ),
        "seq": seqs,
    }
)
step_ids = st.text(chars, min_size=0, max_size=300)
# Step policies (protocol v1.1): an error PUT with a policy of its own.
policy_bodies = members(
    {
        "error": st.just('{"message":"no"}'),
        "policy": either(
            members(
                {
                    "attempts": either(st.integers(-2, 2000).map(str), number_texts),
                    "initial": either(durations),
                    "max": either(durations),
                    "multiplier": either(number_texts),
                }
            )
        ),
        "seq": seqs,
    }
)

# Signals and child runs (protocol v1.1). An invoke of a route that exists would start child
# runs; the route names here are refused before anything is recorded.
signal_bodies = members(
    {"signal": either(members({"timeout": either(durations, number_texts)})), "seq": seqs}
)
invoke_bodies = members(
    {
        "invoke": either(
            members({"route": either(texts.map(_dump), st.just('"nowhere"')), "body": json_texts})
        ),
        "seq": seqs,
    }
)


bodies: dict[str, st.SearchStrategy[str]] = {
    "output": output_bodies,
    "error": error_bodies,
    "sleep": sleep_bodies,
    "wait": wait_bodies,
    "policy": policy_bodies,
    "signal": signal_bodies,
    "invoke": invoke_bodies,
}


def _judge(answer: Answer) -> None:
    assert answer.status < 500, answer
    if answer.status >= 400:
        assert answer.content_type == "application/problem+json", answer
        assert answer.json()["status"] == answer.status


async def _in_thread(held: HeldRun, check: Callable[[SyncClient], None]) -> None:
    client = held.sync()
    try:
        await asyncio.to_thread(check, client)
    finally:
        client.close()
    await held.assert_readable()


# -- step PUTs ------------------------------------------------------------------------------------


def _step_put(kind: str) -> Callable[[SyncClient], None]:
    counter = iter(range(10**9))

    @fuzz
    @given(body=bodies[kind])
    def check(client: SyncClient, body: str) -> None:
        step_id = f"{kind}-{next(counter)}"
        answer = client.put(step_id, body.encode("utf-8", "surrogatepass"))
        _judge(answer)
        client.assert_readable()

    return check


async def test_fuzz_output_puts(held: HeldRun) -> None:
    await _in_thread(held, _step_put("output"))


async def test_fuzz_error_puts(held: HeldRun) -> None:
    await _in_thread(held, _step_put("error"))


async def test_fuzz_sleep_puts(held: HeldRun) -> None:
    await _in_thread(held, _step_put("sleep"))


async def test_fuzz_wait_puts(held: HeldRun) -> None:
    await _in_thread(held, _step_put("wait"))


async def test_fuzz_error_puts_with_a_policy(held: HeldRun) -> None:
    await _in_thread(held, _step_put("policy"))


async def test_fuzz_signal_and_invoke_puts(held: HeldRun) -> None:
    await _in_thread(held, _step_put("signal"))
    await _in_thread(held, _step_put("invoke"))


async def test_fuzz_posts_to_a_signal_url(held: HeldRun) -> None:
    """Whatever is POSTed to a signal's URL (any body, any token) is a 4xx or the one 202."""
    answer = await held.put("approve", {"signal": {"timeout": "1h"}})
    url = answer.json()["url"]
    path, _, token = url.partition("?token=")
    accepted = 0

    def check(client: SyncClient) -> None:
        public = http.client.HTTPConnection("127.0.0.1", held.gw.gateway.public_port, timeout=30)

        @fuzz
        @given(
            body=st.one_of(
                st.binary(max_size=64), json_texts.map(lambda t: t.encode("utf-8", "surrogatepass"))
            ),
            good_token=st.booleans(),
            guess=st.text(chars, max_size=40),
        )
        def post(body: bytes, good_token: bool, guess: str) -> None:
            nonlocal accepted
            query = token if good_token else quote(guess.encode("utf-8", "surrogatepass"))
            public.request("POST", f"{path}?token={query}", body=body)
            resp = public.getresponse()
            data = resp.read()
            if resp.will_close:
                public.close()
            answer = Answer(resp.status, resp.headers.get_content_type(), data)
            accepted += answer.status == 202
            _judge(answer)
            assert answer.status in (202, 400, 404, 409), answer
            client.assert_readable()

        try:
            post()
        finally:
            public.close()

    await _in_thread(held, check)
    assert accepted <= 1  # single use


async def test_fuzz_step_ids_and_raw_bodies(held: HeldRun) -> None:
    @fuzz
    @given(
        step_id=step_ids,
        body=st.one_of(
            st.binary(max_size=64),
            st.sampled_from(list(bodies.values()))
            .flatmap(lambda s: s)
            .map(lambda b: b.encode("utf-8", "surrogatepass")),
        ),
    )
    @example(step_id="\ud800", body=b'{"output":1}')
    @example(step_id="x" * 257, body=b'{"output":1}')
    def check(client: SyncClient, step_id: str, body: bytes) -> None:
        answer = client.put(step_id, body)
        _judge(answer)
        client.assert_readable()

    await _in_thread(held, check)


# -- events ---------------------------------------------------------------------------------------

event_bodies = members(
    {
        "name": either(texts.map(_dump), st.sampled_from(["e"]).map(_dump)),
        "data": json_texts,
        "id": either(texts.map(_dump)),
    }
)


async def test_fuzz_events_and_the_waits_they_complete(held: HeldRun) -> None:
    """Each event is delivered to a wait parked for it, and one registered after it finds it in
    the look-back window: both paths read the stored event back."""
    counter = iter(range(10**9))

    @fuzz
    @given(body=event_bodies)
    @example(body='{"name":"e","data":"\\ud800"}')
    @example(body='{"name":"e","data":' + "[" * 3000 + "]" * 3000 + "}")
    def check(client: SyncClient, body: str) -> None:
        n = next(counter)
        try:
            name = json.loads(body).get("name")
        except (ValueError, RecursionError, AttributeError):
            name = None
        if isinstance(name, str) and name:
            _judge(client.put(f"before-{n}", json.dumps({"wait": {"event": name}}).encode()))
        answer = client.event(body.encode("utf-8", "surrogatepass"))
        _judge(answer)
        if isinstance(name, str) and name:
            _judge(client.put(f"after-{n}", json.dumps({"wait": {"event": name}}).encode()))
        client.assert_readable()

    await _in_thread(held, check)


sent_event_bodies = members(
    {
        "name": either(texts.map(_dump), st.sampled_from(["e"]).map(_dump)),
        "data": json_texts,
        "step": either(texts.map(_dump), step_ids.map(_dump)),
        "seq": seqs,
    }
)


async def test_fuzz_events_sent_by_the_run(held: HeldRun) -> None:
    """POST {cb}/events with the run's token: an event sent as a step (protocol v1.1)."""

    @fuzz
    @given(body=sent_event_bodies)
    @example(body='{"name":"e","step":"s","data":"\ud800"}')
    @example(body='{"name":"e","step":"' + "x" * 300 + '"}')
    def check(client: SyncClient, body: str) -> None:
        raw = body.encode("utf-8", "surrogatepass")
        answer = client.request("POST", f"{held.cb_path}/events", raw, held.auth)
        _judge(answer)
        client.assert_readable()

    await _in_thread(held, check)


# -- admin POSTs and the run list's query ------------------------------------------------------


async def test_fuzz_admin_posts(held: HeldRun) -> None:
    @fuzz
    @given(
        run_id=st.one_of(st.just(held.run_id), step_ids),
        action=st.sampled_from(["retry", "cancel"]),
        body=st.binary(max_size=32),
    )
    def check(client: SyncClient, run_id: str, action: str, body: bytes) -> None:
        if run_id == held.run_id and action == "cancel":
            action = "retry"  # the held run stays running for the next example
        path = f"/v1/runs/{quote(run_id.encode('utf-8', 'surrogatepass'), safe='')}/{action}"
        _judge(client.request("POST", path, body, held.admin))
        client.assert_readable()

    await _in_thread(held, check)


query_values = st.one_of(
    texts,
    number_texts,
    timestamps.map(json.loads),
    st.sampled_from(
        ["²", "\u0661", "nan", "inf", "-inf", "1e400", "0", "500", "501", "0" * 5000 + "1"]
    ),
)


async def test_fuzz_the_run_list_query(held: HeldRun) -> None:
    @fuzz
    @given(
        query=st.dictionaries(
            st.sampled_from(["status", "route", "since", "until", "limit", "cursor"]),
            query_values,
            max_size=4,
        )
    )
    def check(client: SyncClient, query: dict[str, str]) -> None:
        text = "&".join(
            f"{k}={quote(v.encode('utf-8', 'surrogatepass'), safe='')}" for k, v in query.items()
        )
        _judge(client.request("GET", "/v1/runs?" + text, headers=held.admin))

    await _in_thread(held, check)
