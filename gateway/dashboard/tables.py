"""The dashboard's own tables in the control-plane store: admin flags and sampled replica metrics.

They sit in the same database as tasks.store (same engine), on their own metadata, so the dashboard can add
them without changing the store's schema module; `ensure_tables` creates them when missing.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime

from sqlalchemy import Engine, Float, Integer, String
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from tasks.store.schema import UTCDateTime, utcnow


class DashBase(DeclarativeBase):
    pass


class DashboardAdmin(DashBase):
    """A user named here sees every endpoint in the dashboard. Set with `llmhost dashboard admin USER`."""

    __tablename__ = "dashboard_admins"
    user: Mapped[str] = mapped_column(String(200), primary_key=True)
    granted_by: Mapped[str] = mapped_column(String(200))
    granted_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class ReplicaSample(DashBase):
    """One scrape of a replica: vLLM's own gauges plus the hardware it runs on, taken by the gateway."""

    __tablename__ = "replica_samples"
    id: Mapped[int] = mapped_column(primary_key=True)
    ts: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    endpoint: Mapped[str] = mapped_column(String(200), index=True)
    replica_id: Mapped[int] = mapped_column(Integer, index=True)
    replica: Mapped[str] = mapped_column(String(200))
    ok: Mapped[int] = mapped_column(Integer, default=1)
    error: Mapped[str | None] = mapped_column(String(500))
    running: Mapped[float | None] = mapped_column(Float)
    waiting: Mapped[float | None] = mapped_column(Float)
    kv_cache_usage: Mapped[float | None] = mapped_column(Float, doc="0..1, vllm:kv_cache_usage_perc")
    prompt_tokens_total: Mapped[float | None] = mapped_column(Float)
    generation_tokens_total: Mapped[float | None] = mapped_column(Float)
    hw_kind: Mapped[str | None] = mapped_column(String(16), doc="'gpu' (NVML), 'cpu' (psutil) or None")
    cpu_percent: Mapped[float | None] = mapped_column(Float, doc="replica processes, % of all host cores")
    rss_bytes: Mapped[float | None] = mapped_column(Float)
    host_mem_percent: Mapped[float | None] = mapped_column(Float)
    gpu_util: Mapped[float | None] = mapped_column(Float, doc="mean over the replica's GPUs, %")
    gpu_mem_used_bytes: Mapped[float | None] = mapped_column(Float)
    gpu_mem_total_bytes: Mapped[float | None] = mapped_column(Float)


_done: set[int] = set()
_lock = threading.Lock()


def ensure_tables(engine: Engine) -> None:
    """Create the dashboard tables once per engine (a no-op when they exist)."""
    with _lock:
        if id(engine) in _done:
            return
        DashBase.metadata.create_all(engine)
        _done.add(id(engine))


@contextmanager
def dashboard_session(engine: Engine) -> Iterator[Session]:
    """One transaction on the dashboard's own tables, committed on success; rows stay readable after it."""
    with Session(engine, expire_on_commit=False) as s, s.begin():
        yield s
