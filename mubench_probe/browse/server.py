"""Serving the app: host and token rules, a socket bound before the URL is printed, uvicorn.

Loopback is the default; any other host needs a token (anyone who can reach the port could
otherwise read the store). On loopback, requests must name a loopback Host, so a web page
elsewhere cannot reach the server through a rebinding DNS name.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Any

from ..errors import UsageError

LOOPBACK_NAMES = ("localhost",)


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_host(host: str, token: str | None) -> None:
    """Refuse a non-loopback host without a token (UsageError: one line, exit 2)."""
    if token is not None and (len(token) < 8 or not token.isascii() or not token.isprintable() or " " in token):
        raise UsageError("--token must be at least 8 printable ASCII characters without spaces")
    if not is_loopback(host) and not token:
        raise UsageError(
            f"--host {host} makes the store readable from other machines: pass --token SECRET too "
            "(every request must then carry it)"
        )


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: any free port), ready before the URL is printed."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # accepted sockets inherit it: no 40 ms stalls
    try:
        sock.bind((host, port))
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


def url_for(sock: socket.socket, token: str | None) -> str:
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/" + (f"?token={token}" if token else "")


def allowed_hosts(sock: socket.socket) -> tuple[str, ...] | None:
    """Host header values a loopback server answers (None: any, for a server bound elsewhere)."""
    host, port = sock.getsockname()[:2]
    if not is_loopback(host):
        return None
    return (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", f"{host}:{port}")


def make_server(app: Any, log_level: str = "warning") -> Any:
    """A uvicorn server for `app` (run it with `.run(sockets=[sock])`; `should_exit = True` stops it)."""
    import uvicorn

    config = uvicorn.Config(app, log_level=log_level, lifespan="off", access_log=False, server_header=False)
    return uvicorn.Server(config)
