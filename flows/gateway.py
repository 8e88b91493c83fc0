"""The gateway as the flows need it: its URL, started when none answers, and a key for their own eval calls."""

from __future__ import annotations

import subprocess
import sys
import time
from datetime import timedelta

import httpx

from tasks import store
from tasks.core.errors import ServingError
from tasks.core.settings import PROJECT_ROOT, get_settings


def gateway_url() -> str:
    s = get_settings()
    return f"http://{s.gateway_host}:{s.gateway_port}"


def _answers(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def ensure_gateway(timeout_s: float = 60.0) -> str:
    """The gateway's URL; starts `llmhost gateway` as a detached process when none answers."""
    url = gateway_url()
    if _answers(url):
        return url
    s = get_settings()
    s.ensure_dirs()
    log = (s.runs_dir / "gateway.log").open("ab")
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "gateway"], cwd=PROJECT_ROOT, stdout=log,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    (s.home_abs / "gateway.pid").write_text(str(proc.pid))
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServingError(f"the gateway exited with code {proc.returncode}; see {s.runs_dir / 'gateway.log'}")
        if _answers(url):
            return url
        time.sleep(0.5)
    raise ServingError(f"the gateway did not answer {url}/health within {timeout_s:.0f}s; see "
                       f"{s.runs_dir / 'gateway.log'}")


def service_key(endpoint: str, *, user: str = "llmhost-lifecycle") -> str:
    """A fresh key for the flows' own eval calls, granted on `endpoint`; returned, never stored raw or exported."""
    store.ensure_user(user)
    store.grant(endpoint, user=user, actor="lifecycle")
    created = store.create_key(user, expires_in=timedelta(days=1), description="lifecycle eval calls",
                               actor="lifecycle")
    return created.raw
