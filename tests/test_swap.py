"""Swapping a revision in place when the new one cannot start beside the old (tasks.deploy.swap, gateway.hold).

The strategy is a pure decision and is checked as a table. The gateway's hold runs the real gateway in front of a
replica double, with the endpoint marked `swapping` by hand. One test swaps a real endpoint with `swap: hold`
under light load: its old revision is the session's vLLM server, attached, so the test starts one vLLM only.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from threaded_gateway import ThreadedApp, ThreadedGateway, wait_for

from tasks import store
from tasks.core.errors import ConfigError
from tasks.core.settings import PROJECT_ROOT
from tasks.deploy.swap import GiB, Swap, choose_swap_strategy, cpu_room, gpu_room
from tasks.store import audit

MSG = [{"role": "user", "content": "where is my parcel ?"}]


# ---------------------------------------------------------------------------------------------- the decision


@pytest.mark.parametrize(("spec_swap", "fits", "sleep", "expected"), [
    ("auto", True, True, "bluegreen"),
    ("auto", True, False, "bluegreen"),
    ("auto", False, True, "sleep"),
    ("auto", False, False, "hold"),  # the CPU case: vLLM has no sleep mode there
    ("hold", True, False, "hold"),
    ("bluegreen", False, False, "bluegreen"),  # the operator's call: the start may fail, the old one keeps serving
    ("sleep", False, True, "sleep"),
])
def test_the_swap_strategy_follows_the_spec_then_the_room_then_sleep_mode(spec_swap, fits, sleep, expected):
    strategy, why = choose_swap_strategy(spec_swap, fits, sleep)
    assert strategy == expected
    assert ("in the spec" in why) == (spec_swap != "auto"), why


def test_forcing_sleep_where_it_is_unavailable_is_a_one_line_config_error():
    with pytest.raises(ConfigError) as err:
        choose_swap_strategy("sleep", True, False)
    assert err.value.field == "swap" and "swap: hold" in str(err.value) and "\n" not in str(err.value)


def test_the_room_beside_is_vllms_own_memory_rule():
    # CPU: weights + overhead + VLLM_CPU_KVCACHE_SPACE per replica, against the RAM available now.
    assert cpu_room(3 * GiB, 2, 7 * GiB).fits and not cpu_room(3 * GiB, 2, 5 * GiB).fits
    # GPU: vLLM claims gpu_memory_utilization of a whole device and needs that much free to start.
    h100, used_h100 = (80 * GiB, 80 * GiB), (80 * GiB, 6 * GiB)
    assert not gpu_room([used_h100], 1, 0.92).fits  # one busy GPU: the new replica cannot start beside
    assert gpu_room([used_h100, h100], 1, 0.92).fits
    room = gpu_room([used_h100, h100], 2, 0.92)  # tensor parallel 2 needs two free GPUs
    assert not room.fits and "1 of 2" in room.detail


# ---------------------------------------------------------------------------------------------- the gateway's hold


class Replica:
    """A replica double that answers chat at once."""

    def __init__(self) -> None:
        async def health(request: Request) -> Response:
            return JSONResponse({})

        async def chat(request: Request) -> Response:
            body = await request.json()
            return JSONResponse({
                "id": "chatcmpl-s", "object": "chat.completion", "created": int(time.time()), "model": body["model"],
                "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6},
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "shipping"},
                             "finish_reason": "stop"}]})

        self._served = ThreadedApp(Starlette(routes=[
            Route("/health", health), Route("/v1/chat/completions", chat, methods=["POST"])]), what="replica double")
        self.base_url = f"http://127.0.0.1:{self._served.port}/v1"

    def close(self) -> None:
        self._served.close()


@pytest.fixture
def holding_gateway(monkeypatch: pytest.MonkeyPatch) -> Iterator[ThreadedGateway]:
    monkeypatch.setenv("LLMHOST_SWAP_HOLD_S", "3")
    with ThreadedGateway() as gw:
        yield gw


def test_the_gateway_holds_a_swapping_endpoints_requests_then_answers_or_503s(holding_gateway: ThreadedGateway):
    replica = Replica()
    try:
        store.attach_server("swap-held", base_url=replica.base_url, served_model="demo", actor="test")
        store.grant("swap-held", team="swap-team", actor="test")
        key = store.create_key("swap-user", team="swap-team", actor="test").raw
        nxt = store.add_revision("swap-held", {"kind": "test-next"}, served_model_name="demo", status="pending",
                                 actor="test").content_hash[:12]
        with httpx.Client(base_url=holding_gateway.url, headers={"authorization": f"Bearer {key}"},
                          timeout=30) as http:
            def ask() -> httpx.Response:
                return http.post("/v1/chat/completions", json={"model": "swap-held", "messages": MSG})

            assert ask().status_code == 200
            # Held, then answered once the endpoint is active again (the switch to the new revision does that).
            store.upsert_endpoint("swap-held", status="swapping", actor="test")
            assert "swap-held" in {m["id"] for m in http.get("/v1/models").json()["data"]}  # still listed
            got: dict[str, Any] = {}
            t = threading.Thread(target=lambda: got.update(resp=ask(), at=time.monotonic()))
            t0 = time.monotonic()
            t.start()
            time.sleep(1.0)
            assert t.is_alive()  # held, not refused
            store.upsert_endpoint("swap-held", status="active", actor="test")
            t.join(timeout=10)
            assert got["resp"].status_code == 200 and got["resp"].json()["choices"][0]["message"]["content"]
            assert 1.0 <= got["at"] - t0 < 2.5, got["at"] - t0

            # Past the bound (LLMHOST_SWAP_HOLD_S=3): 503 with Retry-After, naming the revision it waits for.
            store.upsert_endpoint("swap-held", status="swapping", actor="test")
            t0 = time.monotonic()
            resp = ask()
            assert 2.9 <= time.monotonic() - t0 < 6
            assert resp.status_code == 503 and resp.headers["retry-after"] == "15"
            err = resp.json()["error"]
            assert err["code"] == "endpoint_swapping"
            assert f"'swap-held' is swapping to revision {nxt}; retry in 15 s" in err["message"], err
    finally:
        store.upsert_endpoint("swap-held", status="stopped", actor="test")
        replica.close()


def test_a_failed_hold_swap_brings_the_old_revision_back_and_releases_held_requests(
    holding_gateway: ThreadedGateway,
):
    """The deploy's in-place stage on its own (no vLLM): make way, then the new revision "fails" and is undone."""
    replica = Replica()
    try:
        old, row = store.attach_server("swap-undo", base_url=replica.base_url, served_model="demo", actor="test")
        store.grant("swap-undo", team="swap-team", actor="test")
        key = store.create_key("swap-undo-user", team="swap-team", actor="test").raw
        swap = Swap("swap-undo", "test", "hold", "swap: hold in the spec", old_rev=old,
                    old_rows=store.list_replicas("swap-undo"))
        with httpx.Client(base_url=holding_gateway.url, headers={"authorization": f"Bearer {key}"},
                          timeout=30) as http:
            swap.make_way()  # drains (nothing in flight), stops routing to the attached server, holds requests
            assert store.get_endpoint("swap-undo").status == "swapping"
            assert store.list_replicas("swap-undo")[0].state == "stopped"
            got: dict[str, Any] = {}
            t = threading.Thread(target=lambda: got.update(resp=http.post(
                "/v1/chat/completions", json={"model": "swap-undo", "messages": MSG})))
            t.start()
            time.sleep(0.5)
            assert t.is_alive()
            swap.restore()  # what a failed start or smoke test of the new revision does
            t.join(timeout=10)
        assert got["resp"].status_code == 200
        assert got["resp"].headers["x-llmhost-revision"] == old.content_hash[:12]
        assert store.get_endpoint("swap-undo").status == "active" and row.id == store.list_replicas("swap-undo")[0].id
        assert store.list_replicas("swap-undo")[0].state == "up"
        facts = swap.facts()
        assert facts["strategy"] == "hold" and facts["pause_s"] >= 1.0  # the drain's 1 s for gateways to see it
        assert facts["old_revision"].startswith("routed to again in ")
    finally:
        store.upsert_endpoint("swap-undo", status="stopped", actor="test")
        replica.close()


# ---------------------------------------------------------------------------------------------- a real swap


@pytest.mark.slow
@pytest.mark.timeout(1500)  # one vLLM start (and the session's server, if no test started it yet)
def test_a_hold_swap_under_load_fails_no_request_and_records_its_pause(
    vllm_server: Any, demo_model_dir: Path, monkeypatch: pytest.MonkeyPatch
):
    from tasks.core.tracking import mlflow_client
    from tasks.deploy import deploy, load_spec, stop_endpoint
    from tasks.deploy.spec import EndpointSpec
    from tasks.register import register_model

    monkeypatch.setenv("LLMHOST_SWAP_HOLD_S", "900")  # a start under the suite's load has been measured at 220 s
    monkeypatch.setenv("LLMHOST_STARTUP_TIMEOUT_S", "900")
    reg = register_model(f"path:{demo_model_dir}", "demo")
    mlflow_client().set_registered_model_alias("demo", "champion", reg.version)
    # The old revision: the session's server, attached (llmhost does not manage it, so `hold` only stops routing
    # to it; the swap's pause, hold and switch are the same as for a managed replica it stops).
    old, _ = store.attach_server("swap-demo", base_url=vllm_server.base_url, served_model="demo", actor="test")
    store.grant("swap-demo", team="swap-team", actor="test")
    raw = load_spec(PROJECT_ROOT / "deployments" / "demo.yaml").model_dump(mode="json")
    raw.update(name="swap-demo", swap="hold", access={"teams": ["swap-team"]})
    spec = EndpointSpec.model_validate(raw)
    key = store.create_key("swap-e2e", team="swap-team", actor="test").raw

    answers: list[tuple[int, str, float]] = []  # (status, revision header, seconds)
    errors: list[str] = []
    stop = threading.Event()

    def load() -> None:
        with httpx.Client(base_url=gw.url, headers={"authorization": f"Bearer {key}"}, timeout=900) as http:
            while not stop.is_set():
                t0 = time.monotonic()
                try:
                    r = http.post("/v1/chat/completions",
                                  json={"model": "swap-demo", "messages": MSG, "max_tokens": 4, "temperature": 0})
                    answers.append((r.status_code, r.headers.get("x-llmhost-revision", "?"), time.monotonic() - t0))
                    if r.status_code != 200:
                        errors.append(f"{r.status_code}: {r.text[:300]}")
                except httpx.HTTPError as exc:
                    errors.append(f"{type(exc).__name__}: {exc}")
                time.sleep(0.2)

    with ThreadedGateway() as gw:
        threads = [threading.Thread(target=load, daemon=True) for _ in range(2)]
        for t in threads:
            t.start()
        try:
            wait_for(lambda: len(answers) >= 3, timeout=60, what="answers from the old revision")
            result = deploy(spec, actor="test")
            time.sleep(1.0)  # a few answers from the new revision too
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=120)
            stop_endpoint("swap-demo", actor="test")
    held = max((s for _, _, s in answers), default=0.0)
    swap = result.swap or {}
    print(f"\nmeasured: pause {swap.get('pause_s')} s, longest held request {held:.1f} s, {len(answers)} answers, "
          f"deploy {result.seconds} s: {result.message}")
    assert result.outcome == "live", result.message
    assert errors == [], errors[:5]
    new = result.revision
    revisions = {rev for _, rev, _ in answers}
    assert {old.content_hash[:12], new} <= revisions, revisions
    facts = (next(r for r in store.list_revisions("swap-demo") if r.content_hash.startswith(new)).facts or {})["swap"]
    assert facts["strategy"] == "hold" and facts["why"] == "swap: hold in the spec"
    assert facts["pause_s"] > 0, facts
    assert facts == swap
    assert held > 5.0  # a request waited through the new replica's start instead of failing
    entries = audit.entries(endpoint="swap-demo")
    decided = [json.loads(e.after or "{}") for e in entries if e.action == "deploy.swap"]
    recorded = [json.loads(e.after or "{}") for e in entries if e.action == "revision.facts" and new in e.links]
    assert decided[-1]["strategy"] == "hold" and decided[-1]["in_place"] is True, decided
    assert recorded[-1]["swap"]["pause_s"] == facts["pause_s"], recorded
    assert store.get_endpoint("swap-demo").status == "stopped"  # active after the swap, then stopped by the test
