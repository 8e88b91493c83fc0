"""The real gateway app under uvicorn in a daemon thread, shared by the test modules that deploy endpoints."""

from __future__ import annotations

import threading
import time

import openai

from tasks.serving.local import free_port


class ThreadedGateway:
    """The real gateway app under uvicorn on a free port, in a daemon thread."""

    def __init__(self) -> None:
        import uvicorn

        from gateway.app import create_app

        self.port = free_port()
        self.server = uvicorn.Server(
            uvicorn.Config(create_app(flush_interval_s=0.2), host="127.0.0.1", port=self.port, log_level="warning")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ThreadedGateway:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "gateway did not start in 30 s"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

    def client(self, key: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key=key, max_retries=0, timeout=120)
