"""The one route declaration style and the router (no relay needed)."""

from __future__ import annotations

import pytest

from protocol.errors import ErrorCode, TetherlessError
from protocol.messages import Health, SendRequest
from relay.api.context import Api
from relay.api.routes import all_routes
from relay.api.routing import AUTH_ERRORS, Call, MethodNotAllowedError, Router, RouteTable


def _table() -> RouteTable:
    table = RouteTable("test")

    @table.route("GET", "/v1/things", response=Health, auth=True, errors=(ErrorCode.FORBIDDEN,))
    async def things(api: Api, call: Call) -> Health:
        """GET /v1/things — Things"""
        return Health(status="ok")

    @table.route("POST", "/v1/things", body=SendRequest, response=Health, ip_limited=True)
    async def add_thing(api: Api, call: Call) -> Health:
        """POST /v1/things — Add a thing"""
        return Health(status="ok")

    @table.route("GET", "/v1/accounts/{account_id}/things", also=("/v1/other/{account_id}/things",), response=Health)
    async def account_things(api: Api, call: Call) -> Health:
        """GET /v1/accounts/{account_id}/things — An account's things"""
        return Health(status="ok")

    return table


def test_static_paths_are_one_dict_lookup_and_head_is_get() -> None:
    router = Router(_table().routes)
    route, params = router.resolve("GET", "/v1/things")
    assert (route.summary, params) == ("Things", {})
    assert router.resolve("HEAD", "/v1/things")[0] is route
    assert "/v1/things" in router._static  # the performance task relies on static paths not being scanned


def test_templated_paths_and_aliases() -> None:
    router = Router(_table().routes)
    account = "abcdefghijklmnopqrstuvwxyz234567"
    for path in (f"/v1/accounts/{account}/things", f"/v1/other/{account}/things"):
        assert router.resolve("GET", path)[1] == {"account_id": account}
    operation_ids = sorted(r.operation_id for r in _table().routes)
    assert operation_ids == ["account_things", "account_things_other", "add_thing", "things"]


def test_unknown_path_and_wrong_method() -> None:
    router = Router(_table().routes)
    with pytest.raises(TetherlessError) as raised:
        router.resolve("GET", "/v1/nothing")
    assert raised.value.code is ErrorCode.NOT_FOUND
    with pytest.raises(TetherlessError):
        router.resolve("GET", "/v1/accounts/not an id/things")
    with pytest.raises(MethodNotAllowedError) as refused:
        router.resolve("DELETE", "/v1/things")
    assert refused.value.allowed == ["GET", "POST"]


def test_framework_adds_the_errors_of_the_steps_before_the_handler() -> None:
    things, add_thing, account_things, _ = _table().routes
    assert things.errors[: len(AUTH_ERRORS)] == AUTH_ERRORS
    assert ErrorCode.DEVICE_REVOKED in things.errors
    assert ErrorCode.FORBIDDEN in things.errors
    assert ErrorCode.NOT_ACCEPTABLE in things.errors
    assert {ErrorCode.RATE_LIMITED, ErrorCode.MALFORMED_BODY, ErrorCode.BODY_TOO_LARGE} <= set(add_thing.errors)
    assert ErrorCode.MISSING_TOKEN not in add_thing.errors
    assert ErrorCode.NOT_FOUND in account_things.errors
    assert ErrorCode.NOT_FOUND not in things.errors


def test_a_handler_must_name_its_route_in_its_docstring() -> None:
    table = RouteTable("test")
    with pytest.raises(ValueError, match="GET /v1/x — "):

        @table.route("GET", "/v1/x", response=Health)
        async def wrong(api: Api, call: Call) -> Health:
            """GET /v1/y — Another path"""
            return Health(status="ok")


def test_a_route_declared_twice_is_refused() -> None:
    routes = _table().routes
    with pytest.raises(ValueError, match="declared twice"):
        Router([*routes, routes[0]])


def test_the_relay_table_builds_and_metrics_can_leave_it() -> None:
    routes = all_routes()
    Router(routes)
    assert any(r.template == "/metrics" for r in routes)
    assert not any(r.template == "/metrics" for r in all_routes(metrics=False))
    assert len(all_routes(metrics=False)) == len(routes) - 1
