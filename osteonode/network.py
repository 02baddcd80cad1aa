"""What every association of the node shares, as SCP or SCU: socket options and pynetdicom's start-up settings.

:func:`init_pynetdicom` is the one explicit initialisation of pynetdicom's
process-wide settings; the CLI calls it once at start-up (every command,
``serve``, ``worker``, ``send``, runs through it).
"""

from __future__ import annotations

import socket

from pynetdicom import _config, evt


def init_pynetdicom() -> None:
    """Set pynetdicom's process-wide options the node relies on (idempotent).

    * ``STORE_SEND_CHUNKED_DATASET``: a C-STORE of a file path streams the
      file as encoded, in its own transfer syntax, without decoding it into
      memory (the dispatcher offers only the file's own transfer syntax).
    """
    _config.STORE_SEND_CHUNKED_DATASET = True


def set_tcp_nodelay(event: evt.Event) -> None:
    """EVT_CONN_OPEN handler: disable Nagle's algorithm on the association's socket.

    Without it each C-STORE waits for the peer's delayed ACK (~40 ms on Linux),
    capping throughput near 20 instances/s.
    """
    sock = event.assoc.dul.socket.socket
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
