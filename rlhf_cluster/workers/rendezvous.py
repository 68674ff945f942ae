"""The TCP stores our process groups meet at: bound to one address, on a port held from the start.

torch.distributed's ``TCPStore`` (the trainers' rendezvous and the gloo weight-transfer group)
has no authentication, and by default its host listens on every interface of its machine on a
port someone chose earlier: pick port 0, close the socket, hand the number out and hope nobody
takes it before the store binds it again. Here the store's host (rank 0) instead opens its
listening socket when the port is chosen — on the node's cluster address only — keeps it open,
and gives that very socket to the store (``master_listen_fd``), so there is no window in which
another process can take the port and nothing listens on interfaces the cluster does not use.

The store still has no authentication: it belongs on the cluster's private network, like Ray's
own ports (the README's cluster section says so).
"""

from __future__ import annotations

import datetime
import socket
import threading

_lock = threading.Lock()
_held: dict[int, socket.socket] = {}


def reserve(host: str) -> int:
    """Open a listening socket on ``host`` at a port the kernel picks and hold it; returns the port.

    The process that later hosts the store on that port (:func:`store` with ``is_host``) takes
    the socket over; until then nothing else can bind the port.
    """
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    try:
        sock.bind((host, 0))
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    port = sock.getsockname()[1]
    with _lock:
        _held[port] = sock
    return port


def release(port: int) -> None:
    """Close a reserved port that will not be used (a setup that failed before its store started)."""
    with _lock:
        sock = _held.pop(port, None)
    if sock is not None:
        sock.close()


def store(host: str, port: int, world_size: int, is_host: bool, timeout_s: float):
    """A ``TCPStore`` at ``host:port``; the host serves it from the socket :func:`reserve` holds for the port.

    A host whose port was not reserved in this process (a port chosen elsewhere) binds it the usual way.
    """
    from torch.distributed import TCPStore

    timeout = datetime.timedelta(seconds=timeout_s)
    with _lock:
        sock = _held.pop(port, None) if is_host else None
    if sock is None:
        return TCPStore(host, port, world_size, is_host, timeout)
    fd = sock.detach()  # the store owns the listening socket from here on
    return TCPStore(host, port, world_size, True, timeout, master_listen_fd=fd)
