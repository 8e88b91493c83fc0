"""Usage that survives `kill -9`: every answer a client received has its usage row, once, after a restart.

The real gateway runs as a subprocess (`python -m flows.cli gateway`) in front of a small OpenAI-compatible
double attached as an endpoint (no vLLM here). Client threads call it with the openai SDK, plain and streamed,
and the gateway is SIGKILLed under load, restarted, and killed again, for several rounds. Each answer carries
its request id (`x-llmhost-request-id`), so the test checks ids, not only counts.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from sqlalchemy import MetaData, Table, create_engine, func, inspect, select, text
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from threaded_gateway import ThreadedApp, wait_for

from tasks import store
from tasks.core.settings import PROJECT_ROOT
from tasks.serving.local import free_port

ENDPOINT = "durable"
ROUNDS = 4
CLIENTS = 6
MSG = [{"role": "user", "content": "where is my parcel ?"}]


class Upstream:
    """An attached OpenAI-compatible server: answers at once, with usage, plain or streamed."""

    def __init__(self) -> None:

        async def health(request: Request) -> Response:
            return JSONResponse({})

        async def chat(request: Request) -> Response:
            body = await request.json()
            usage = {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
            base = {"id": "chatcmpl-d", "created": int(time.time()), "model": body.get("model")}
            if not body.get("stream"):
                return JSONResponse({**base, "object": "chat.completion", "usage": usage, "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": "shipping"}, "finish_reason": "stop"}]})

            def event(choices: list[Any], use: Any = None) -> str:
                return "data: " + json.dumps({**base, "object": "chat.completion.chunk", "choices": choices,
                                              "usage": use}) + "\n\n"

            async def gen() -> Any:
                yield event([{"index": 0, "delta": {"role": "assistant", "content": "ship"}, "finish_reason": None}])
                yield event([{"index": 0, "delta": {"content": "ping"}, "finish_reason": "stop"}])
                if (body.get("stream_options") or {}).get("include_usage"):
                    yield event([], usage)
                yield "data: [DONE]\n\n"

            return StreamingResponse(gen(), media_type="text/event-stream")

        app = Starlette(routes=[Route("/health", health), Route("/v1/chat/completions", chat, methods=["POST"])])
        self._served = ThreadedApp(app, what="upstream")
        self.port = self._served.port

    def close(self) -> None:
        self._served.close()


class GatewayProcess:
    """`llmhost gateway` as the operator starts it, on a free port, over the test's state dir."""

    def __init__(self, log_path: Path) -> None:
        self.port = free_port()
        self.log = log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "flows.cli", "gateway", "--port", str(self.port), "--log-level", "warning"],
            cwd=PROJECT_ROOT, env=dict(os.environ), stdout=self.log, stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{self.port}"

        def up() -> bool:
            assert self.proc.poll() is None, f"gateway exited; see {log_path}"
            try:
                return httpx.get(f"{self.url}/health", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(up, timeout=90, what="gateway /health")

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)
        self.log.close()

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=60)
        self.log.close()


@dataclass
class Tally:
    answered: set[str] = field(default_factory=set)  # request ids of complete 200 answers
    failed: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


def client_loop(url: str, key: str, stop: threading.Event, tally: Tally, n: int) -> None:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=20)
    i = 0
    while not stop.is_set():
        i += 1
        rid = None
        try:
            if (i + n) % 2:
                raw = client.chat.completions.with_raw_response.create(model=ENDPOINT, messages=MSG, max_tokens=2)
                rid = raw.headers["x-llmhost-request-id"]
                assert raw.parse().choices[0].message.content == "shipping"
            else:
                with client.chat.completions.with_streaming_response.create(
                        model=ENDPOINT, messages=MSG, max_tokens=2, stream=True) as resp:
                    rid = resp.headers["x-llmhost-request-id"]
                    text_ = "".join(c.choices[0].delta.content or "" for c in resp.parse() if c.choices)
                assert text_ == "shipping"
        except (openai.APIError, httpx.HTTPError, AssertionError, KeyError):
            with tally.lock:
                tally.failed += 1
            if stop.is_set():
                return
            time.sleep(0.01)
            continue
        with tally.lock:
            tally.answered.add(rid)


@pytest.fixture(scope="module")
def upstream() -> Iterator[Upstream]:
    up = Upstream()
    yield up
    up.close()


def stored_ids(key_prefix: str) -> list[str | None]:
    return [r.request_id for r in store.list_usage(key_prefix=key_prefix) if r.status_code == 200]


@pytest.mark.slow
def test_no_answered_request_loses_its_usage_row_across_kill_9(upstream: Upstream, llmhost_home: Path) -> None:
    store.attach_server(ENDPOINT, base_url=f"http://127.0.0.1:{upstream.port}/v1", served_model="tiny",
                        actor="test")
    store.grant(ENDPOINT, team="durable-team", actor="test")
    log_path = llmhost_home / "runs" / "durability-gateway.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    rng = random.Random(17)
    report = []
    gw = GatewayProcess(log_path)
    pids = [gw.proc.pid]  # this test's gateways: in a full session other in-process gateways keep journals too
    try:
        for rnd in range(ROUNDS):
            key = store.create_key(f"durable-r{rnd}", team="durable-team", actor="test")
            tally, stop = Tally(), threading.Event()
            threads = [threading.Thread(target=client_loop, args=(gw.url, key.raw, stop, tally, n), daemon=True)
                       for n in range(CLIENTS)]
            for t in threads:
                t.start()
            wait_for(lambda t=tally: len(t.answered) >= 20, timeout=60, what="answers under load")
            time.sleep(rng.uniform(0.3, 1.5))
            gw.kill()  # SIGKILL, mid-load: no shutdown hook runs
            stop.set()
            for t in threads:
                t.join(timeout=30)
            before = set(stored_ids(key.info.prefix))
            gw = GatewayProcess(log_path)  # replays the dead gateway's journal before it answers /health
            pids.append(gw.proc.pid)
            after = stored_ids(key.info.prefix)
            lost = tally.answered - set(after)
            extra = set(after) - tally.answered
            dupes = len(after) - len(set(after))
            report.append({"round": rnd, "answered_200": len(tally.answered), "metered_after_restart": len(after),
                           "stored_before_restart": len(tally.answered & before), "lost": len(lost),
                           "duplicates": dupes, "metered_not_answered": len(extra), "client_failures": tally.failed})
            print(json.dumps(report[-1]))
            assert not lost, f"round {rnd}: {len(lost)} answered requests have no usage row"
            assert dupes == 0
            # A row may be durable for a request whose answer the kill cut off; each such one is a client failure.
            assert len(extra) <= tally.failed
    finally:
        if gw.proc.poll() is None:
            gw.stop()
    journal = llmhost_home / "usage-journal"
    left = [p for p in journal.rglob("*") if p.is_file() and p.name.lstrip(".").split("-")[0] in map(str, pids)]
    assert not left, f"a clean stop leaves no journal behind: {left}"
    # The journal carried rows the store did not have yet when the gateway died.
    assert sum(r["answered_200"] - r["stored_before_restart"] for r in report) > 0, report


def test_journal_replay_writes_each_row_once(tmp_path: Path, store_url: str) -> None:
    """On SQLite and PostgreSQL: a row stored twice (replay after a flush, a retried flush) is kept once."""
    from datetime import UTC, datetime

    from gateway.journal import Journal, replay
    from tasks.store.usage import USAGE_FIELDS, add_usage

    engine = store.get_engine(store_url)
    rows = [{"ts": datetime.now(UTC), "route": "chat", "stream": False, "status_code": 200, "latency_ms": 1.0,
             "key_prefix": "replay", "request_id": f"r-{i}"} for i in range(5)]
    journal = Journal(tmp_path / "j")
    journal.write(0, rows[:3], USAGE_FIELDS)
    journal.write(1, rows[3:], USAGE_FIELDS)
    with (tmp_path / "j" / f"{journal.token}-00000001.jsonl").open("ab") as f:
        f.write(b'{"ts": "2026-')  # a line torn by the crash: its request was never answered
    add_usage(rows[:2], engine=engine)  # the meter had flushed these before the crash
    assert replay(tmp_path / "j", lambda b: add_usage(b, engine=engine)) == (0, 0)  # still locked: alive
    journal.close(remove=False)  # what a crash leaves: the segments and an unheld lock file
    assert replay(tmp_path / "j", lambda b: add_usage(b, engine=engine)) == (2, 5)
    assert replay(tmp_path / "j", lambda b: add_usage(b, engine=engine)) == (0, 0)
    assert list((tmp_path / "j").iterdir()) == []
    add_usage(rows, engine=engine)  # and once more, as a retried flush would
    got = sorted(r.request_id for r in store.list_usage(key_prefix="replay", engine=engine))
    assert got == [f"r-{i}" for i in range(5)]


def test_an_old_store_gains_a_unique_request_id_over_its_null_rows(tmp_path: Path) -> None:
    from datetime import UTC, datetime

    from tasks.store.schema import Base, UsageRecord, get_engine
    from tasks.store.usage import add_usage

    url = f"sqlite:///{tmp_path / 'old.db'}"
    old = create_engine(url)
    Base.metadata.create_all(old)
    before = MetaData()  # the table as an older llmhost made it, with rows in it
    Table("usage_records", before, *[c._copy() for c in UsageRecord.__table__.columns if c.name != "request_id"])
    with old.begin() as c:
        c.execute(text("DROP TABLE usage_records"))
        before.create_all(c)
        for _ in range(2):
            c.execute(text("INSERT INTO usage_records (ts, route, stream, status_code, latency_ms) "
                           "VALUES ('2026-01-01 00:00:00', 'chat', 0, 200, 1.0)"))
    old.dispose()
    engine = get_engine(url)
    assert any(ix["unique"] and ix["column_names"] == ["request_id"]
               for ix in inspect(engine).get_indexes("usage_records"))
    row = {"ts": datetime.now(UTC), "route": "chat", "stream": False, "status_code": 200, "latency_ms": 1.0,
           "request_id": "only-once"}
    add_usage([row], engine=engine)
    add_usage([row, row], engine=engine)
    with engine.connect() as c:
        assert c.execute(select(func.count()).select_from(UsageRecord)).scalar() == 3


@pytest.mark.parametrize("sync", ["write", "fdatasync"])
async def test_meter_journals_each_row_before_the_answer_ends(tmp_path: Path, sync: str) -> None:
    """With the store flush far away, the row is in the journal once `record` (and its future) returned."""
    from datetime import UTC, datetime

    from gateway.journal import replay
    from gateway.metering import Meter, Metrics
    from tasks.store.usage import add_usage

    engine = store.get_engine(f"sqlite:///{tmp_path / 'meter.db'}")
    meter = Meter(engine, Metrics(), flush_interval_s=3600, journal_dir=tmp_path / "j", journal_sync=sync)
    await meter.recover()
    meter.start()
    rows = [{"ts": datetime.now(UTC), "route": "chat", "stream": False, "status_code": 200, "latency_ms": 1.0,
             "ttft_ms": None, "key_prefix": "meter"} for _ in range(20)]
    futures = [meter.record(r) for r in rows]  # concurrent requests: group commit
    assert (futures[0] is None) == (sync == "write")
    for fut in futures:
        await meter.durable(fut)
    journaled = b"".join(p.read_bytes() for p in (tmp_path / "j").glob("*.jsonl"))
    assert all(r["request_id"].encode() in journaled for r in rows)
    assert store.list_usage(key_prefix="meter", engine=engine) == []  # not flushed yet
    # A crash now: the process's lock goes with it, and the next start replays the rows.
    assert meter._journal is not None
    meter._journal.close(remove=False)
    assert replay(tmp_path / "j", lambda b: add_usage(b, engine=engine)) == (1, 20)
    assert len(store.list_usage(key_prefix="meter", engine=engine)) == 20
    meter._journal = None
    await meter.close()  # the same rows flushed again are skipped
    assert len(store.list_usage(key_prefix="meter", engine=engine)) == 20


@pytest.mark.parametrize("sync", ["write", "fdatasync"])
async def test_the_journal_keeps_only_what_the_store_lacks(tmp_path: Path, sync: str) -> None:
    from datetime import UTC, datetime

    from gateway.metering import Meter, Metrics

    engine = store.get_engine(f"sqlite:///{tmp_path / 'keep.db'}")
    meter = Meter(engine, Metrics(), flush_interval_s=3600, journal_dir=tmp_path / "j", journal_sync=sync)
    await meter.recover()
    meter.start()

    def segments() -> list[str]:
        return sorted(p.name for p in (tmp_path / "j").glob("*.jsonl"))

    for batch in range(3):
        for _ in range(5):
            await meter.durable(meter.record({"ts": datetime.now(UTC), "route": "chat", "stream": False,
                                              "status_code": 200, "latency_ms": 1.0, "ttft_ms": None}))
        assert len(segments()) == 1
        await meter.flush()  # stored: the segment goes
        assert segments() == [], batch
    await meter.close()
    assert list((tmp_path / "j").iterdir()) == []  # the lock file too
    assert len(store.list_usage(engine=engine)) == 15


async def test_an_idle_meter_sleeps_until_a_row_comes_and_stores_it_one_interval_later(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No flush (no wake-up of the gateway's loop) while nothing is pending; a row is stored `flush_interval_s`
    after it was recorded, a full batch at once, and a failed flush is retried one interval later."""
    import asyncio
    import time
    from datetime import UTC, datetime

    from gateway.metering import Meter, Metrics

    engine = store.get_engine(f"sqlite:///{tmp_path / 'idle.db'}")
    meter = Meter(engine, Metrics(), flush_interval_s=0.4, batch_size=10, journal_dir=tmp_path / "j")
    await meter.recover()
    flushes: list[float] = []
    real_flush = meter.flush

    async def counted() -> int:
        flushes.append(time.monotonic())
        return await real_flush()

    meter.flush = counted  # type: ignore[method-assign]
    meter.start()

    def row(prefix: str) -> dict[str, object]:
        return {"ts": datetime.now(UTC), "route": "chat", "stream": False, "status_code": 200, "latency_ms": 1.0,
                "ttft_ms": None, "key_prefix": prefix}

    await asyncio.sleep(1.3)  # three intervals idle
    assert flushes == []

    t0 = time.monotonic()
    meter.record(row("one"))
    while not store.list_usage(key_prefix="one", engine=engine):
        assert time.monotonic() - t0 < 5, "a lone row was not stored"
        await asyncio.sleep(0.02)
    assert len(flushes) == 1 and 0.35 <= flushes[0] - t0 < 1.5

    await asyncio.sleep(1.0)  # idle again: no more flushes
    assert len(flushes) == 1

    t1 = time.monotonic()
    for _ in range(10):
        meter.record(row("batch"))
    await asyncio.sleep(0.1)  # a full batch does not wait for the interval
    assert len(flushes) == 2 and flushes[1] - t1 < 0.3
    assert len(store.list_usage(key_prefix="batch", engine=engine)) == 10

    # The store refuses once: the rows stay pending and the next try comes one interval later.
    fail = {"left": 1}
    import gateway.metering as metering

    real_add = metering.add_usage

    def flaky(rows: list[dict[str, object]], **kw: object) -> int:
        if fail["left"]:
            fail["left"] -= 1
            raise RuntimeError("database is locked")
        return real_add(rows, **kw)

    monkeypatch.setattr(metering, "add_usage", flaky)
    t2 = time.monotonic()
    meter.record(row("retry"))
    while not store.list_usage(key_prefix="retry", engine=engine):
        assert time.monotonic() - t2 < 5, "the row was not stored after a failed flush"
        await asyncio.sleep(0.02)
    assert len(flushes) == 4 and 0.35 <= flushes[3] - flushes[2] < 1.5
    await meter.close()
