"""Per-request metrics (``relay.metrics.observe_request``): counted once per answer, with bounded labels.

The application keeps the metric children per (route, method, status) instead of calling
``labels()`` twice per request; these tests pin that the counts are still right and that a
client choosing methods cannot add label sets (every unknown method is counted as "OTHER").
"""

from __future__ import annotations

import trio

from relay import metrics
from relay.api.application import Application
from relay.api.context import Api
from relay.api.http import Request, Response
from relay.api.routes import all_routes


def _application() -> Application:
    # /livez and the unmatched paths use neither the services nor the discovery document.
    return Application(Api(None, None, 1.0), all_routes())  # type: ignore[arg-type]


def _answer(app: Application, method: str, path: str) -> Response:
    request = Request(method, path, "", (), b"", "127.0.0.1:1", "2")
    return trio.run(app, request)


def _count(route: str, method: str, status: str) -> float:
    labels = {"route": route, "method": method, "status": status}
    return metrics.REGISTRY.get_sample_value("relay_http_requests_total", labels) or 0.0


def _observed(route: str) -> float:
    return metrics.REGISTRY.get_sample_value("relay_http_request_duration_seconds_count", {"route": route}) or 0.0


def _method_labels() -> set[str]:
    return {
        sample.labels["method"]
        for family in metrics.REGISTRY.collect()
        if family.name == "relay_http_requests"
        for sample in family.samples
    }


def test_each_answer_is_counted_once_with_its_route_method_and_status() -> None:
    app = _application()
    before = (_count("/livez", "GET", "200"), _observed("/livez"), _count("unmatched", "GET", "404"))
    for _ in range(3):
        assert _answer(app, "GET", "/livez").status == 200
    assert _answer(app, "GET", "/no/such/route").status == 404
    assert _count("/livez", "GET", "200") == before[0] + 3
    assert _observed("/livez") == before[1] + 3
    assert _count("unmatched", "GET", "404") == before[2] + 1


def test_a_client_choosing_methods_adds_no_label_sets() -> None:
    app = _application()
    before = (_count("unmatched", "OTHER", "405"), _count("unmatched", "OTHER", "404"))
    for i in range(50):
        assert _answer(app, f"BREW{i}", "/livez").status == 405  # a route's path: 405, counted too
        assert _answer(app, f"BREW{i}", f"/nothing/{i}").status == 404
    assert _count("unmatched", "OTHER", "405") == before[0] + 50
    assert _count("unmatched", "OTHER", "404") == before[1] + 50
    assert _method_labels() <= metrics.HTTP_METHODS | {"OTHER"}
    assert len(metrics._request_children) < 100
