"""The usage journal: append-only files that make a usage row durable before its answer leaves the gateway.

Each gateway process writes its own segments, `<token>-<n>.jsonl` (one JSON row a line), next to a lock file
`<token>.lock` that it holds with flock for its lifetime. The meter appends each row before its answer ends
(write() only, or fdatasync'd in groups: see gateway.metering.Meter), copies the rows into the store every
flush, and then drops the segments the store now covers. After a crash the kernel releases the lock, so the next
gateway to start finds the segments unlocked and replays them; the store skips rows whose request id it has.

Not thread-safe: the meter calls `write` and `discard_before` from one thread (the event loop's, or with
fdatasync a dedicated one).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import secrets
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson

log = logging.getLogger("llmhost.gateway.metering")


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Journal:
    """This process's segments in `directory`."""

    def __init__(self, directory: Path):
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.token = f"{os.getpid()}-{secrets.token_hex(4)}"
        # Lock under a temporary name, then rename: a replaying gateway never sees this lock file unlocked.
        tmp = directory / f".{self.token}.lock.tmp"
        self._lock_fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.rename(tmp, self.lock_path)
        _fsync_dir(directory)
        self._fd: int | None = None
        self._segment = -1

    @property
    def lock_path(self) -> Path:
        return self.directory / f"{self.token}.lock"

    def _path(self, segment: int) -> Path:
        return self.directory / f"{self.token}-{segment:08d}.jsonl"

    def write(self, segment: int, rows: Sequence[dict[str, Any]], fields: Sequence[str], *, sync: bool = True) -> None:
        """Append `rows` to `segment`: into the kernel (safe from the process dying), with `sync` onto the disk."""
        data = b"".join(orjson.dumps({k: r.get(k) for k in fields}, default=str,
                                     option=orjson.OPT_APPEND_NEWLINE) for r in rows)
        fd = self._fd
        if fd is None or segment != self._segment:
            if fd is not None:
                os.close(fd)
                self._fd = None
            fd = self._fd = os.open(self._path(segment), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            self._segment = segment
            if sync:
                _fsync_dir(self.directory)  # the new file's name must survive a power cut as well as its data
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        if sync:
            os.fdatasync(fd)

    def discard_before(self, segment: int) -> None:
        """Delete the segments below `segment`: the store holds all their rows."""
        for path in self.directory.glob(f"{self.token}-*.jsonl"):
            n = int(path.stem.rsplit("-", 1)[1])
            if n < segment:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                if n == self._segment and self._fd is not None:
                    os.close(self._fd)
                    self._fd, self._segment = None, -1

    def close(self, *, remove: bool) -> None:
        """Release the lock; with `remove`, delete the segments first (the store holds every row)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if remove:
            self.discard_before(2**31)
            with contextlib.suppress(FileNotFoundError):
                self.lock_path.unlink()
        os.close(self._lock_fd)


def replay(directory: Path, store_rows: Callable[[list[dict[str, Any]]], int]) -> tuple[int, int]:
    """Copy the segments of gateways that are gone into the store, then delete them: (files, rows).

    A segment's last line may be torn by the crash: its request never got an answer, so it is skipped.
    """
    if not directory.is_dir():
        return 0, 0
    files = rows_seen = 0
    tokens = {p.name.rsplit("-", 1)[0] for p in directory.glob("*.jsonl")}
    tokens |= {p.name.removesuffix(".lock") for p in directory.glob("*.lock")}
    for token in sorted(tokens):
        lock = directory / f"{token}.lock"
        fd = None
        if lock.exists():
            fd = os.open(lock, os.O_RDONLY)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # a live gateway's own journal
                os.close(fd)
                continue
        try:
            segments = sorted(directory.glob(f"{token}-*.jsonl"))
            rows = [row for path in segments for row in _read(path)]
            if rows:
                store_rows(rows)
            for path in segments:
                path.unlink()
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()
            files += len(segments)
            rows_seen += len(rows)
        finally:
            if fd is not None:
                os.close(fd)
    return files, rows_seen


def _read(path: Path) -> list[dict[str, Any]]:
    out = []
    for line in path.read_bytes().split(b"\n"):
        if not line:
            continue
        try:
            row = orjson.loads(line)
        except orjson.JSONDecodeError:
            log.warning("skipping a torn line in %s (its request was never answered)", path.name)
            continue
        if isinstance(row, dict) and isinstance(row.get("ts"), str):
            row["ts"] = datetime.fromisoformat(row["ts"])
            out.append(row)
    return out
