"""The process groups' TCP stores: on the cluster address only, on a port held from the moment it is chosen."""

import socket
import threading

import psutil
import pytest

from rlhf_cluster.workers import rendezvous


def _listening(port: int) -> set[str]:
    return {c.laddr.ip for c in psutil.Process().net_connections(kind="tcp")
            if c.status == psutil.CONN_LISTEN and c.laddr.port == port}


def test_a_reserved_port_cannot_be_taken_and_the_store_serves_it_on_that_address_only():
    port = rendezvous.reserve("127.0.0.1")
    with socket.socket() as other, pytest.raises(OSError):  # no close-and-rebind window: the port is held
        other.bind(("127.0.0.1", port))
    got = {}

    def client():
        c = rendezvous.store("127.0.0.1", port, 2, False, 30)
        c.set("from_rank1", b"hello")
        got["back"] = c.get("from_rank0")

    t = threading.Thread(target=client)
    t.start()
    host = rendezvous.store("127.0.0.1", port, 2, True, 30)  # serves the reserved socket, waits for rank 1
    host.set("from_rank0", b"hi")
    t.join(30)
    assert host.get("from_rank1") == b"hello" and got["back"] == b"hi"
    assert _listening(port) == {"127.0.0.1"}  # not 0.0.0.0: only the address the cluster uses


def test_a_released_reservation_frees_the_port():
    port = rendezvous.reserve("127.0.0.1")
    rendezvous.release(port)
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
    assert not _listening(port)
