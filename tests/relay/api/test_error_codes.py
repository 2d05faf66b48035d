"""Every error code each route can answer with, derived from the code, against the OpenAPI document.

For each route the codes are derived by an AST walk (tests/relay/api/raises.py) from
the handler and from the steps ``Application._dispatch`` runs before it for
that route's flags; the OpenAPI document generated from the route table (and
the committed docs/openapi.json) must list exactly those codes. A code the
code can raise but the document lacks fails here, and so does a documented
code nothing raises.
"""

from __future__ import annotations

import ast
import inspect
import json
import textwrap

import pytest

from protocol.errors import STATUS, ErrorCode
from relay.api.application import Application
from relay.api.openapi import openapi_document
from relay.api.routes import all_routes
from relay.api.routing import Route

from .raises import ROOT, analysis, explain

E = ErrorCode

# What Application._dispatch runs before the handler, by route flag (test_dispatch_runs_these_steps checks
# that _dispatch calls each of them).
IP_LIMIT = ("relay.services.abuse.AbuseLimits.unauthenticated_request",)
AUTH = ("relay.services.auth.AuthService.authenticate", "relay.services.abuse.AbuseLimits.device_request")
SIGNED = ("relay.services.federation.FederationService.authenticate",)
QUERY = ("relay.api.routing.parse_query",)
BODY = ("protocol.codec.media_type_of", "protocol.codec.decode")
NEGOTIATE = ("protocol.codec.negotiate",)
# Codes raised outside the functions above, and why.
PATH_NOT_FOUND = E.NOT_FOUND  # Router.resolve: a path parameter that does not match its pattern matches no route
BODY_EXTRA = (
    E.MALFORMED_BODY,  # _dispatch: a POST without the body the route needs
    E.BODY_TOO_LARGE,  # the transport refuses a body above max_body_bytes before the application sees it
)
# Codes any request may meet; the document's info.description names them once instead of on every operation.
GENERIC = {E.UNAVAILABLE, E.INTERNAL}
# Calls the walk does not follow (caller, callee; "*": from any caller), each with the reason its codes cannot
# reach the client. Keep this short: every entry is a claim a reviewer should be able to check.
NOT_FOLLOWED: dict[tuple[str, str], str] = {
    ("*", "relay.store.postgres.PostgresStore._run"): (
        "its invalid_field is for values the database refuses (a NUL character in text): only request bodies "
        "carry free text, and every route with a body documents invalid_field already"
    ),
    ("relay.services.accounts.AccountService.device_list_chain", "protocol.codec.decode"): (
        "decodes device lists this relay verified and encoded itself"
    ),
    ("relay.services.enrolment.EnrolmentService.get_offer", "protocol.codec.decode"): (
        "decodes an offer this relay verified and encoded itself"
    ),
    ("relay.services.enrolment.EnrolmentService.get_proposal", "protocol.codec.decode"): (
        "decodes a proposal this relay verified and encoded itself"
    ),
    ("relay.services.federation.FederationService._fetch_keys", "protocol.codec.decode"): (
        "its errors become peer_unavailable: the handler re-raises only peer_address_refused, which decode never raises"
    ),
    ("relay.services.federation.FederationService._signed_headers", "protocol.federation.sign_request"): (
        "signs this relay's own outbound request; its bad_signature is for received components with line breaks"
    ),
}


def derived_codes(route: Route) -> dict[ErrorCode, str]:
    """code -> the call chain that raises it, for every code ``route`` can answer with (GENERIC excepted)."""
    a = analysis()
    roots = [f"{route.endpoint.__module__}.{route.endpoint.__name__}"]
    roots += IP_LIMIT if route.ip_limited else ()
    roots += AUTH if route.auth else ()
    roots += SIGNED if route.signed else ()
    roots += QUERY if route.query else ()
    roots += BODY if route.body is not None else ()
    roots += NEGOTIATE if route.raw_content_type is None else ()
    found: dict[ErrorCode, str] = {}
    for root in roots:
        for code in a.codes(root, NOT_FOLLOWED):
            found.setdefault(code, " -> ".join(explain(root, code, NOT_FOLLOWED)))
    if route.path_params:
        found.setdefault(PATH_NOT_FOUND, "Router.resolve")
    if route.body is not None:
        for code in BODY_EXTRA:
            found.setdefault(code, "Application._dispatch / transport")
    return {code: why for code, why in found.items() if code not in GENERIC}


def documented_codes(document: dict[str, object], route: Route) -> dict[str, int]:
    """code -> status, from the document's problem responses of ``route``."""
    operation = document["paths"][route.template][route.method.lower()]  # type: ignore[index]
    codes: dict[str, int] = {}
    for status, response in operation["responses"].items():
        description = response["description"]
        if description.startswith("Problem: "):
            for code in description.removeprefix("Problem: ").split(", "):
                codes[code] = int(status)
    return codes


ROUTES = all_routes()


@pytest.mark.parametrize("route", ROUTES, ids=[f"{r.method} {r.template}" for r in ROUTES])
def test_document_lists_exactly_the_codes_the_code_raises(route: Route) -> None:
    derived = derived_codes(route)
    documented = documented_codes(openapi_document(ROUTES), route)
    missing = {code.value: why for code, why in derived.items() if code.value not in documented}
    assert not missing, f"raised but not documented (add to the route's errors=): {json.dumps(missing, indent=1)}"
    unraised = sorted(set(documented) - {code.value for code in derived} - {code.value for code in GENERIC})
    assert not unraised, f"documented but nothing raises it (remove from the route's errors=): {unraised}"
    for code, status in documented.items():
        assert status == STATUS[ErrorCode(code)]


def test_committed_document_is_the_generated_one() -> None:
    """docs/openapi.json is what the code generates (regenerate: tetherless admin openapi > docs/openapi.json)."""
    committed = json.loads((ROOT / "docs" / "openapi.json").read_text())
    assert committed == openapi_document(ROUTES)


def test_authenticated_routes_document_device_revoked() -> None:
    """The drift the issue found: device_revoked is raised on every authenticated route."""
    document = openapi_document(ROUTES)
    for route in ROUTES:
        if route.auth:
            assert documented_codes(document, route)["device_revoked"] == 401, route.template


def test_dispatch_runs_these_steps() -> None:
    """The step functions above are the ones Application._dispatch calls (else the derivation misses codes)."""
    source = textwrap.dedent(inspect.getsource(Application._dispatch))
    called = {
        node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Call)
    }
    for step in (*IP_LIMIT, *AUTH, *SIGNED, *QUERY, *BODY, *NEGOTIATE):
        assert step.rsplit(".", 1)[1] in called, step


def test_walk_finds_codes_through_services_and_stores() -> None:
    """The analysis itself: codes raised in a service, a store rule and a protocol function are all found."""
    a = analysis()
    assert E.IDEMPOTENCY_CONFLICT in a.codes("relay.api.messages.send")  # raised in both stores' SQL paths
    assert E.LOG_CONFLICT in a.codes("relay.api.account_log.append")  # relay/store/log_rules.plan_append
    assert E.BAD_SIGNATURE in a.codes("relay.api.accounts.create_account")  # protocol.device_list
    assert E.UNKNOWN_ACCOUNT not in a.codes("relay.api.ops.livez")


@pytest.mark.parametrize(("caller", "callee"), list(NOT_FOLLOWED))
def test_not_followed_calls_exist(caller: str, callee: str) -> None:
    """Each exception above still names a call the code makes (a stale entry would hide nothing, silently)."""
    a = analysis()
    assert callee in a.index.functions, callee
    if caller == "*":
        return
    assert callee in a.summary(a.index.functions[caller]).callees, f"{caller} no longer calls {callee}"
