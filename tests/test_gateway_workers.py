"""`llmhost gateway --workers 2`: two gateway processes on one port meter every request once and refuse a revoked
key at once, whichever of them answers.

The gateway runs as the operator starts it (a subprocess of the console entry point); its upstream is
benchmarks/instant_upstream.py served in a thread and attached as an OpenAI-compatible server.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from threaded_gateway import ThreadedApp, wait_for

from tasks import store
from tasks.core.settings import PROJECT_ROOT
from tasks.serving.local import free_port

ENDPOINT = "workers-ep"
MSG: Any = [{"role": "user", "content": "where is my parcel ?"}]
N = 40


def _instant_app() -> Any:
    path = PROJECT_ROOT / "benchmarks" / "instant_upstream.py"
    spec = importlib.util.spec_from_file_location("instant_upstream", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.app


@pytest.fixture()
def upstream() -> Iterator[ThreadedApp]:
    served = ThreadedApp(_instant_app(), what="instant upstream")
    yield served
    served.close()


def start_gateway(log_path: Path, workers: int) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    with log_path.open("ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "gateway", "--port", str(port),
                                 "--workers", str(workers), "--log-level", "warning"],
                                cwd=PROJECT_ROOT, env=dict(os.environ), stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        assert proc.poll() is None, f"gateway exited:\n{log_path.read_text()[-3000:]}"
        try:
            return httpx.get(f"{url}/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(up, timeout=90, what="gateway /health")
    return proc, url


def fresh_client(url: str, key: str) -> openai.OpenAI:
    # A new connection per request (Connection: close), so the kernel hands requests to either worker.
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=20,
                         default_headers={"connection": "close"})


def call(url: str, key: str, i: int) -> str:
    """One request through the SDK, plain or streamed; the gateway's request id of the answer."""
    client = fresh_client(url, key)
    if i % 2:
        raw = client.chat.completions.with_raw_response.create(model=ENDPOINT, messages=MSG, max_tokens=8)
        assert raw.parse().choices[0].message.content == "Your parcel is on its way."
        return raw.headers["x-llmhost-request-id"]
    with client.chat.completions.with_streaming_response.create(model=ENDPOINT, messages=MSG, max_tokens=8,
                                                                stream=True) as resp:
        rid = resp.headers["x-llmhost-request-id"]
        chunks: Any = resp.parse()
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Your parcel is on its way."
    return rid


def test_two_workers_meter_every_request_once_and_refuse_a_revoked_key(upstream: ThreadedApp,
                                                                      tmp_path: Path) -> None:
    store.attach_server(ENDPOINT, base_url=f"http://127.0.0.1:{upstream.port}/v1", served_model="instant",
                        actor="test")
    store.ensure_user("workers-user")
    store.grant(ENDPOINT, user="workers-user", actor="test")
    key = store.create_key("workers-user", actor="test")
    before = {u.request_id for u in store.list_usage(endpoint=ENDPOINT)}
    proc, url = start_gateway(tmp_path / "gateway.log", workers=2)
    try:
        # /health answers once one worker listens; the other may still be starting (seen once in CI: all N requests
        # went to the first). Both are serving once fresh connections have reached two boot tokens.
        warm_ids: list[str] = []

        def both_answer() -> bool:
            warm_ids.append(call(url, key.raw, 1))
            return len({rid.rsplit("-", 1)[0] for rid in warm_ids}) == 2

        wait_for(both_answer, timeout=90, what="both gateway workers answering")
        with ThreadPoolExecutor(8) as pool:
            ids = list(pool.map(lambda i: call(url, key.raw, i), range(N)))
        assert len(set(ids)) == N
        # A request id starts with its process's boot token: both workers answered some of the N requests.
        assert len({rid.rsplit("-", 1)[0] for rid in ids}) == 2, ids

        store.revoke_key(key.info.prefix, actor="test")
        for i in range(6):  # the very next request, and more on fresh connections, whichever worker takes them
            with pytest.raises(openai.AuthenticationError):
                fresh_client(url, key.raw).chat.completions.create(model=ENDPOINT, messages=MSG, max_tokens=8,
                                                                   stream=bool(i % 2))
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    assert proc.returncode == 0, (tmp_path / "gateway.log").read_text()[-3000:]
    earlier = before | set(warm_ids)
    rows = [u for u in store.list_usage(endpoint=ENDPOINT) if u.request_id not in earlier]
    assert sorted(str(u.request_id) for u in rows) == sorted(ids)  # N rows exactly: none lost, none twice
    assert all(u.status_code == 200 and u.prompt_tokens == 9 and u.completion_tokens == 7 for u in rows)
    assert sum(u.stream for u in rows) == N // 2
