"""The ASGI app of `probe browse`: page routes from a registry, static files, token, security headers.

Read-only by construction: every route answers GET/HEAD only and a middleware refuses any other
method before routing. Static files are read into memory at start and served by name from that
table, so no part of a URL ever reaches the filesystem. With a token, every request must carry
it (header `X-Probe-Token`, query `token=`, or the cookie set when a page was opened with
`?token=`: module scripts and images cannot send headers). A loopback server answers only
loopback Host headers (no DNS rebinding).
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Sequence
from http.cookies import SimpleCookie
from importlib import resources
from typing import Any
from urllib.parse import parse_qs

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import BaseRoute, Route

from . import errors, image, maps, overview, search, thumbs
from .context import BrowseContext

RouteFactory = Callable[[BrowseContext], Sequence[BaseRoute]]
ROUTES: tuple[RouteFactory, ...] = (
    overview.routes,
    image.routes,
    errors.routes,
    maps.routes,
    search.routes,
    thumbs.routes,
)

TOKEN_HEADER = "x-probe-token"
TOKEN_COOKIE = "probe_token"
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; connect-src 'self'; "
    "worker-src 'self' blob:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS = (
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"cross-origin-resource-policy", b"same-origin"),
    (b"cache-control", b"no-store"),
)
TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
}


def static_files() -> dict[str, bytes]:
    """Every bundled front-end file, by its path under static/ (read once; served from this table)."""
    root = resources.files(__package__) / "static"
    out: dict[str, bytes] = {}

    def walk(node: Any, prefix: str) -> None:
        for child in node.iterdir():
            name = f"{prefix}{child.name}"
            if child.is_dir():
                walk(child, name + "/")
            elif child.name.endswith(tuple(TYPES)):
                out[name] = child.read_bytes()

    walk(root, "")
    return out


def _static_routes() -> list[BaseRoute]:
    files = static_files()

    def serve(request: Request) -> Response:
        name = request.path_params["name"]
        data = files.get(name)  # a lookup, never a path: `..`, `%2e%2e`, absolute names all miss
        if data is None:
            return PlainTextResponse("not found", status_code=404)
        return Response(data, media_type=TYPES["." + name.rsplit(".", 1)[-1]])

    def index(request: Request) -> Response:
        return Response(files["index.html"], media_type=TYPES[".html"])

    return [Route("/", index, methods=["GET"]), Route("/static/{name:path}", serve, methods=["GET"])]


class Guard:
    """ASGI middleware: GET/HEAD only, the token when one is set, security headers on every answer."""

    def __init__(self, app: Any, token: str | None, hosts: tuple[str, ...] | None = None) -> None:
        self.app, self.token, self.hosts = app, token, hosts

    def _authorised(self, scope: dict[str, Any]) -> tuple[bool, bool]:
        """(request carries the token, it came in the query: set the cookie)."""
        if self.token is None:
            return True, False
        headers = dict(scope.get("headers") or [])
        given = [headers.get(TOKEN_HEADER.encode(), b"").decode("latin-1")]
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        in_query = query.get("token", [""])[-1]
        given.append(in_query)
        cookie = SimpleCookie()
        try:
            cookie.load(headers.get(b"cookie", b"").decode("latin-1"))
        except Exception:  # a malformed cookie header is just no token
            cookie = SimpleCookie()
        if TOKEN_COOKIE in cookie:
            given.append(cookie[TOKEN_COOKIE].value)
        ok = any(g and hmac.compare_digest(g.encode(), self.token.encode()) for g in given)
        return ok, ok and bool(in_query) and hmac.compare_digest(in_query.encode(), self.token.encode())

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        ok, set_cookie = self._authorised(scope)
        extra = list(SECURITY_HEADERS)
        if set_cookie and self.token is not None:
            extra.append((b"set-cookie", f"{TOKEN_COOKIE}={self.token}; Path=/; HttpOnly; SameSite=Strict".encode()))

        async def send_with_headers(message: Any) -> None:
            if message["type"] == "http.response.start":
                have = {name.lower() for name, _ in message.get("headers", [])}
                message["headers"] = [*message.get("headers", []), *(h for h in extra if h[0] not in have)]
            await send(message)

        host = dict(scope.get("headers") or []).get(b"host", b"").decode("latin-1")
        if self.hosts is not None and host not in self.hosts:
            await PlainTextResponse("unknown host", status_code=400)(scope, receive, send_with_headers)
        elif scope["method"] not in ("GET", "HEAD"):
            resp: Response = PlainTextResponse("read-only: only GET and HEAD", status_code=405)
            resp.headers["allow"] = "GET, HEAD"
            await resp(scope, receive, send_with_headers)
        elif not ok:
            await PlainTextResponse("token required", status_code=401)(scope, receive, send_with_headers)
        else:
            await self.app(scope, receive, send_with_headers)


def create_app(ctx: BrowseContext, token: str | None = None, hosts: tuple[str, ...] | None = None) -> Starlette:
    """The app over `ctx`: pages from ROUTES, static files, and the Guard around everything
    (`hosts`: the Host headers to answer, None for any)."""
    routes: list[BaseRoute] = []
    for factory in ROUTES:
        routes += factory(ctx)
    routes += _static_routes()
    app = Starlette(routes=routes, middleware=[Middleware(Guard, token=token, hosts=hosts)])
    app.state.ctx = ctx
    return app
