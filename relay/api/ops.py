"""Operations and discovery: probes, metrics, this API's document, ``/.well-known/tetherless``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from protocol.errors import ErrorCode as E
from protocol.errors import TetherlessError
from protocol.messages import API_VERSION, Health, RelayKey, WellKnown
from relay.metrics import render

from .context import Api
from .http import Request, Response, problem_response
from .routing import Call, RouteTable

ROUTES = RouteTable("operations")


@ROUTES.route("GET", "/livez", also=("/healthz",), response=Health)
async def livez(api: Api, call: Call) -> Health:
    """GET /livez — Liveness probe (also /healthz)"""
    return Health(status="ok")


@ROUTES.route("GET", "/readyz", response=Health, errors=(E.UNAVAILABLE,))
async def readyz(api: Api, call: Call) -> Health:
    """GET /readyz — Readiness probe (503 unavailable while starting or draining)"""
    if not api.ready:
        raise TetherlessError(E.UNAVAILABLE, "starting or draining", retry_after_seconds=1)
    return Health(status="ready")


@ROUTES.route("GET", "/metrics", raw_content_type="text/plain")
async def metrics(api: Api, call: Call) -> Response:
    """GET /metrics — Prometheus metrics"""
    return metrics_response()


def metrics_response() -> Response:
    """The Prometheus exposition of this process's registry."""
    body, content_type = render()
    return Response(200, [("content-type", content_type)], body)


async def metrics_listener(request: Request) -> Response:
    """The handler of the separate metrics listener (``metrics_listen``): ``GET /metrics`` and nothing else.

    No route table, no authentication, no body parsing: it answers
    ``not_found`` for any other path and ``method_not_allowed`` for any
    other method. Never raises.
    """
    if request.path != "/metrics":
        return problem_response(TetherlessError(E.NOT_FOUND, "this listener serves only /metrics"))
    if request.method not in ("GET", "HEAD"):
        response = problem_response(TetherlessError(E.METHOD_NOT_ALLOWED, "method not allowed here"))
        response.headers.append(("allow", "GET"))
        return response
    return metrics_response()


@ROUTES.route("GET", "/openapi.json", raw_content_type="application/json")
async def openapi(api: Api, call: Call) -> Response:
    """GET /openapi.json — This document"""
    return Response(200, [("content-type", "application/json")], api.openapi_document)


@ROUTES.route("GET", "/.well-known/tetherless", response=WellKnown, tag="relay")
async def well_known_doc(api: Api, call: Call) -> WellKnown:
    """GET /.well-known/tetherless — Relay discovery"""
    return api.well_known


def well_known(
    relay: str,
    relay_key: bytes,
    limits: Any,
    *,
    relay_keys: Sequence[RelayKey] = (),
    federation_endpoint: str | None = None,
) -> WellKnown:
    """The discovery document of a relay (served unchanged for the life of the process)."""
    return WellKnown(
        relay=relay,
        relay_key=relay_key,
        api_versions=[API_VERSION],
        limits=limits,
        federation_endpoint=federation_endpoint,
        relay_keys=list(relay_keys),
    )
