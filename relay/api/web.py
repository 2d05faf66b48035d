"""The browser client at ``/``: its built files, the headers that confine it, and CORS for other origins.

The relay serves the built client (``web/dist/``, committed; web/README.md)
so that a user needs nothing but a browser. :meth:`WebClient.load` reads the
files once, at start-up, into memory: a request never touches the disk, and
only a file that was in the directory then is served, under exactly its own
path. Each file is a static route, so no request path is ever turned into a
file name: there is nothing to traverse, no listing, and what appears in the
directory later is not served.

The routes are declared with the one decorator
(:meth:`~relay.api.routing.RouteTable.route`) when the files are loaded,
because only then are their names known. They go through the router (HEAD,
405, metrics) but stay out of the OpenAPI document
(``Application(unlisted=…)``): they are the application, not the protocol,
and the document must not change with the build or a setting.

Every answer of the client carries :func:`security_headers`: a
Content-Security-Policy that allows only this origin's own scripts, styles,
images, workers and manifest, no inline code, no ``eval``, Trusted Types for
DOM sinks, and network access only to this relay (plus
``web_connect_origins``). An E2EE client's keys live in the page, so a
script injected into it would hold them: the policy is the backstop.

:class:`CorsGate` is the other half of "another relay's app": a relay's API
answers a page from another origin only when that origin is listed in its
``cors_allowed_origins`` (docs/operations.md "Web client").
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from .context import Api
from .http import Handler, Request, Response
from .routing import Call, Route, RouteTable

# The repository's build, when the relay runs from a checkout (or an editable install). An installed wheel
# has no web/ next to its packages: the container image copies web/dist and sets web_dist.
CHECKOUT_DIST = Path(__file__).resolve().parents[2] / "web" / "dist"
INDEX = "index.html"

# The types the build can produce; any other file makes the directory unusable (a typo in web_dist pointing
# at the wrong tree should stop the relay, not serve octet-streams).
CONTENT_TYPES: Mapping[str, str] = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json",
    ".webmanifest": "application/manifest+json",
    ".txt": "text/plain; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".webp": "image/webp",
    ".ico": "image/x-icon",
    ".woff2": "font/woff2",
    ".wasm": "application/wasm",
}
MAX_FILES = 1000
MAX_TOTAL_BYTES = 64 * 1024 * 1024  # all files together, held in memory
# One path segment that needs no percent-encoding and is not hidden: the URL path is the file's path.
_SEGMENT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")

SELF = "'self'"
CONTENT_SECURITY_POLICY = (
    "default-src 'none'",
    "script-src 'self'",
    "style-src 'self'",
    "img-src 'self' data:",
    "connect-src 'self'",  # + web_connect_origins
    "manifest-src 'self'",
    "worker-src 'self'",
    "base-uri 'none'",
    "form-action 'none'",
    "frame-ancestors 'none'",
    # Strings never reach innerHTML, document.write or script URLs: the client builds the DOM with textContent.
    "require-trusted-types-for 'script'",
)
# Powerful features the client does not use. WebAuthn (publickey-credentials-*) keeps its default: this origin.
PERMISSIONS_POLICY = "camera=(), microphone=(), geolocation=(), payment=(), usb=()"
# Unhashed file names (app.js, not app-3f2a.js): every load revalidates with the ETag (a 304 costs a round
# trip, no bytes), so index.html and app.js of two different builds never meet. Offline the service worker
# serves the shell, not the HTTP cache.
CACHE_CONTROL = "no-cache"

# CORS: what a page from a listed origin may send and read. Bearer tokens travel in Authorization, never in
# cookies, so credentials mode is never allowed.
# The media routes are tus 1.0 (docs/blobs.md): a browser tus client sends and reads their headers.
CORS_ALLOWED_HEADERS = (
    "authorization, content-type, accept, tus-resumable, upload-length, upload-metadata, upload-offset,"
    " upload-checksum, tetherless-capability, range"
)
CORS_EXPOSED_HEADERS = (
    "retry-after, location, upload-offset, upload-length, upload-expires, tus-resumable, tus-version, tus-max-size,"
    " tus-extension, tus-checksum-algorithm, tetherless-blob-id, content-range, content-length, etag, accept-ranges"
)
CORS_MAX_AGE_SECONDS = 600


class WebClientError(Exception):
    """The directory cannot be served as the browser client (the message says which file and why)."""


@dataclass(frozen=True, slots=True)
class Asset:
    """One built file, as served."""

    body: bytes
    content_type: str
    etag: str  # strong: quoted SHA-256 prefix of the body


def security_headers(connect_origins: Sequence[str] = ()) -> tuple[tuple[str, str], ...]:
    """The headers on every answer of the browser client; ``connect_origins`` join ``connect-src``."""
    connect = " ".join((SELF, *connect_origins))
    policy = "; ".join(f"connect-src {connect}" if d.startswith("connect-src ") else d for d in CONTENT_SECURITY_POLICY)
    return (
        ("content-security-policy", policy),
        ("x-content-type-options", "nosniff"),
        ("referrer-policy", "no-referrer"),
        ("cross-origin-opener-policy", "same-origin"),
        ("cross-origin-resource-policy", "same-origin"),
        ("permissions-policy", PERMISSIONS_POLICY),
    )


def read_assets(directory: Path) -> dict[str, Asset]:
    """Every servable file under ``directory`` by URL path (``/app.js``), and ``/`` for ``index.html``.

    Hidden files and directories (a leading dot) are skipped. Raises
    :class:`WebClientError` when ``directory`` is not a directory or has no
    ``index.html``, when a name would need percent-encoding or has a type
    not in :data:`CONTENT_TYPES`, or beyond :data:`MAX_FILES` /
    :data:`MAX_TOTAL_BYTES`. Blocking file I/O: call it from a thread.
    """
    if not directory.is_dir():
        raise WebClientError("not a directory")
    assets: dict[str, Asset] = {}
    total = 0
    for file in sorted(directory.rglob("*")):
        parts = file.relative_to(directory).parts
        if any(part.startswith(".") for part in parts) or not file.is_file():
            continue
        name = "/".join(parts)
        if not all(_SEGMENT.fullmatch(part) for part in parts):
            raise WebClientError(f"{name}: a file name must be letters, digits, '.', '-' or '_'")
        content_type = CONTENT_TYPES.get(file.suffix.lower())
        if content_type is None:
            raise WebClientError(f"{name}: unknown type {file.suffix or '(no extension)'!r}")
        if len(assets) >= MAX_FILES:
            raise WebClientError(f"more than {MAX_FILES} files")
        body = file.read_bytes()
        total += len(body)
        if total > MAX_TOTAL_BYTES:
            raise WebClientError(f"more than {MAX_TOTAL_BYTES} bytes of files")
        digest = hashlib.sha256(body).digest()[:18]
        assets["/" + name] = Asset(body, content_type, f'"{base64.urlsafe_b64encode(digest).decode()}"')
    if "/" + INDEX not in assets:
        raise WebClientError(f"no {INDEX}")
    assets["/"] = assets["/" + INDEX]
    return assets


def _etag_matches(if_none_match: str | None, etag: str) -> bool:
    """RFC 9110 §13.1.2: weak comparison against each listed tag, or ``*``."""
    if not if_none_match:
        return False
    tags = (tag.strip().removeprefix("W/") for tag in if_none_match.split(","))
    return any(tag in ("*", etag) for tag in tags)


class WebClient:
    """The browser client's files in memory, and the routes that serve them."""

    def __init__(self, assets: Mapping[str, Asset], *, connect_origins: Sequence[str] = ()) -> None:
        if "/" not in assets:
            raise ValueError("the assets need an index at /")
        self.assets = dict(assets)
        self._headers = security_headers(connect_origins)
        self.routes = self._declare()

    @classmethod
    def load(
        cls, directory: Path, *, connect_origins: Sequence[str] = (), reserved_paths: Collection[str] = ()
    ) -> WebClient:
        """The client built in ``directory``, refusing a file whose path is in ``reserved_paths`` (the API's).

        Raises :class:`WebClientError` (see :func:`read_assets`, and for a
        file that would hide an API route). Blocking file I/O: call it from a
        thread.
        """
        assets = read_assets(directory)
        hidden = sorted(set(assets) & set(reserved_paths))
        if hidden:
            raise WebClientError(f"{hidden[0].lstrip('/')}: the relay's API already answers {hidden[0]}")
        return cls(assets, connect_origins=connect_origins)

    def answer(self, request: Request) -> Response:
        """The file at ``request.path`` (a path the routes declared), or 304 when the client's copy is current.

        Never raises for a declared path; a path that is not one raises
        ``KeyError`` (the router never sends one).
        """
        asset = self.assets[request.path]
        headers = [*self._headers, ("cache-control", CACHE_CONTROL), ("etag", asset.etag)]
        if _etag_matches(request.header("if-none-match"), asset.etag):
            return Response(304, headers)
        return Response(200, [("content-type", asset.content_type), *headers], asset.body)

    def _declare(self) -> list[Route]:
        table = RouteTable("web")
        files = tuple(sorted(path for path in self.assets if path != "/"))

        # raw_content_type: not a protocol message, so no content negotiation (each file has its own type).
        @table.route("GET", "/", also=files, raw_content_type="text/html")
        async def web_client(api: Api, call: Call) -> Response:
            """GET / — The browser client: index.html here, each other built file at its own path"""
            return self.answer(call.request)

        return table.routes


class CorsGate:
    """A :data:`~relay.api.http.Handler` in front of the application: CORS for the listed origins only.

    A request whose ``Origin`` is listed gets ``Access-Control-Allow-Origin``
    (and the exposed headers) on whatever the application answers, errors
    included, so a page there can read problems; its preflight (``OPTIONS``
    with ``Access-Control-Request-Method`` naming one of ``methods``) is
    answered 204 here. Any other request passes through unchanged but for
    ``Vary: Origin``, so a shared cache never hands one origin's answer to
    another; an unlisted origin's preflight reaches the application, which
    answers 405 as before, and the browser refuses the call.
    """

    def __init__(self, handler: Handler, allowed_origins: Iterable[str], methods: Iterable[str]) -> None:
        self._handler = handler
        self._allowed = frozenset(allowed_origins)
        self._methods = frozenset(methods) | {"HEAD"}
        self._preflight_headers = (
            ("access-control-allow-methods", ", ".join(sorted(self._methods))),
            ("access-control-allow-headers", CORS_ALLOWED_HEADERS),
            ("access-control-max-age", str(CORS_MAX_AGE_SECONDS)),
            ("cache-control", "no-store"),
            ("vary", "origin"),
        )

    async def __call__(self, request: Request) -> Response:
        """Answer ``request`` through the application, adding CORS headers; raises what the handler raises."""
        origin = request.header("origin")
        if origin is None or origin not in self._allowed:
            response = await self._handler(request)
            return dataclasses.replace(response, headers=[*response.headers, ("vary", "origin")])
        requested = request.header("access-control-request-method")
        if request.method == "OPTIONS" and requested in self._methods:
            return Response(204, [("access-control-allow-origin", origin), *self._preflight_headers])
        response = await self._handler(request)
        added = [
            ("access-control-allow-origin", origin),
            ("access-control-expose-headers", CORS_EXPOSED_HEADERS),
            ("vary", "origin"),
        ]
        return dataclasses.replace(response, headers=[*response.headers, *added])
