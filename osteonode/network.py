"""What every association of the node shares, as SCP or SCU: socket options, TLS and pynetdicom's start-up settings.

:func:`init_pynetdicom` is the one explicit initialisation of pynetdicom's
process-wide settings; the dispatcher (:mod:`osteonode.dispatch`) calls it
before each association it opens, so commands that send nothing (``analyze``)
do not import pynetdicom at all.

DICOM TLS follows the Non-downgrading BCP 195 TLS Secure Transport
Connection Profile (PS3.15 B.9): TLS 1.2 or higher only, the cipher suites of
:data:`BCP195_TLS12_CIPHERS`, certificates on both sides (configurable).
"""

from __future__ import annotations

import socket
import ssl
from typing import TYPE_CHECKING, Any

from pynetdicom import _config, evt

if TYPE_CHECKING:
    from osteonode.config import TLSSettings


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
    transport = event.assoc.dul.socket
    if transport is not None and transport.socket is not None:
        transport.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


#: TLS 1.2 cipher suites of the Non-downgrading BCP 195 TLS Secure Transport Connection Profile (PS3.15 B.9):
#: the recommended suites of RFC 7525 / RFC 9325 section 4.2 (forward secrecy, AEAD), in OpenSSL's names.
#: TLS 1.3 suites are all AEAD with forward secrecy and are left at OpenSSL's defaults.
BCP195_TLS12_CIPHERS = ":".join([
    "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-RSA-AES256-GCM-SHA384",
    "DHE-RSA-AES128-GCM-SHA256", "DHE-RSA-AES256-GCM-SHA384",
])


class _DeferredHandshakeContext(ssl.SSLContext):
    """A server context whose handshake is left to the connection's own thread.

    pynetdicom wraps each accepted socket in the thread that accepts
    connections; with the default ``do_handshake_on_connect`` one peer that
    connects and sends nothing would stop every other connection from being
    accepted. Deferred, the handshake runs in the connection's thread
    (:func:`osteonode.ingest.scp.handshake_tls`, else at the first read),
    bounded by ``network_timeout_s``, and a failed handshake closes only that
    connection.
    """

    def wrap_socket(self, sock: socket.socket, server_side: bool = False,
                    do_handshake_on_connect: bool = True, *args: Any, **kwargs: Any) -> ssl.SSLSocket:
        """Wrap ``sock`` with the handshake left to the first read, whatever the caller asked."""
        return super().wrap_socket(sock, server_side, False, *args, **kwargs)


def server_context(tls: TLSSettings) -> ssl.SSLContext:
    """The SCP's TLS context: TLS 1.2 or higher, BCP 195 cipher suites, the node's certificate.

    With ``tls.require_peer_certificate`` a caller must present a certificate
    signed by a CA of ``tls.ca_bundle`` (or of the system's store when absent).

    Raises
    ------
    ssl.SSLError, OSError
        Certificate, key or CA bundle unreadable or not matching.
    """
    ctx = _DeferredHandshakeContext(ssl.PROTOCOL_TLS_SERVER)
    _configure(ctx, tls, ssl.Purpose.CLIENT_AUTH)
    ctx.verify_mode = ssl.CERT_REQUIRED if tls.require_peer_certificate else ssl.CERT_NONE
    return ctx


def client_context(tls: TLSSettings) -> ssl.SSLContext:
    """An SCU's TLS context: TLS 1.2 or higher, BCP 195 cipher suites, the node's certificate as client certificate.

    With ``tls.require_peer_certificate`` the peer's certificate must be
    signed by a CA of ``tls.ca_bundle`` (or of the system's store when
    absent) and, with ``tls.check_hostname``, name the host dialled.

    Raises
    ------
    ssl.SSLError, OSError
        Certificate, key or CA bundle unreadable or not matching.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    _configure(ctx, tls, ssl.Purpose.SERVER_AUTH)
    ctx.check_hostname = tls.require_peer_certificate and tls.check_hostname
    ctx.verify_mode = ssl.CERT_REQUIRED if tls.require_peer_certificate else ssl.CERT_NONE
    return ctx


def _configure(ctx: ssl.SSLContext, tls: TLSSettings, purpose: ssl.Purpose) -> None:
    """Protocol floor, cipher suites, own certificate and trusted CAs shared by both sides."""
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2  # non-downgrading: never TLS 1.0/1.1 (RFC 8996)
    ctx.set_ciphers(BCP195_TLS12_CIPHERS)
    ctx.load_cert_chain(tls.certificate, tls.private_key)
    if tls.ca_bundle is not None:
        ctx.load_verify_locations(cafile=tls.ca_bundle)
    else:
        ctx.load_default_certs(purpose)
