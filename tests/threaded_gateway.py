"""The real gateway app under uvicorn in a daemon thread, shared by the test modules that call it over HTTP."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import openai

from tasks.serving.local import free_port


def wait_for(pred: Callable[[], Any], timeout: float = 30.0, what: str = "condition") -> Any:
    """Poll `pred` until it returns something truthy, and return that."""
    deadline = time.monotonic() + timeout
    while True:
        got = pred()
        if got:
            return got
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


class ThreadedApp:
    """An ASGI app (a replica or provider double) under uvicorn in a daemon thread on a free port; started."""

    def __init__(self, app: Any, *, what: str = "app") -> None:
        import uvicorn

        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    access_log=False))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        wait_for(lambda: self.server.started, what=f"{what} start")

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


class ThreadedGateway:
    """The real gateway app (optionally with the dashboard mounted) under uvicorn on a free port."""

    def __init__(self, *, flush_interval_s: float = 0.2, dashboard: bool = False, access_log: bool = False,
                 sample_interval_s: float = 1.0) -> None:
        import uvicorn

        from gateway.app import create_app

        self.app = create_app(flush_interval_s=flush_interval_s)
        self.gw = self.app.state.gateway
        self.dashboard = None
        if dashboard:
            from gateway.dashboard import mount

            self.dashboard = mount(self.app.app, self.gw, sample_interval_s=sample_interval_s)
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port,
                                                    log_level="info" if access_log else "warning",
                                                    access_log=access_log))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> ThreadedGateway:
        self.thread.start()
        wait_for(lambda: self.server.started, what="gateway start")
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

    def client(self, key: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, timeout=120)
