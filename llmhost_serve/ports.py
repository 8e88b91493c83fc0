"""A free port, and who listens on it: shared by the Ray replica (here, shipped alone to the cluster) and the
control plane's servers (re-exported by `tasks.core.procs`). Needs only the standard library and psutil, which
both environments have."""

from __future__ import annotations

import contextlib
import socket

import psutil


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS says is free now. Another process can draw it too before the caller's server binds it: a
    server's start checks `listens` before it trusts an answer on the port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def listens(pid: int, port: int) -> bool:
    """Whether process `pid`, or a process under it (e.g. vLLM's API servers with --api-server-count), listens on
    TCP `port`.

    A server started on a port from `free_port` binds it seconds later (vLLM: after its imports), so another
    process can draw the same port meanwhile: an answer on the port proves nothing until the kernel says whose
    socket it is."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return False
    for p in procs:
        with contextlib.suppress(psutil.Error):
            if any(c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port
                   for c in p.net_connections(kind="tcp")):
                return True
    return False
