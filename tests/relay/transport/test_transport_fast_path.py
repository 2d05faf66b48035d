"""The single-send fast path: response headers validated and encoded once, h2's own outbound checks off.

With ``validate_outbound_headers=False`` the transport's own check in
``base.response_headers`` is the only thing between an application header
and the wire, so these tests pin that it refuses every bad header on every
call (a refused list is never cached) and that what it caches is never
aliased by a caller.
"""

from __future__ import annotations

import hashlib
import inspect
import sys

import h2.connection
import h2.errors
import pytest
from hyperframe.frame import Frame

from relay import metrics
from relay.api.http import Request, Response
from relay.transport import base, http2
from tests.relay.transport.transport_testing import H2Client, make_config, problem_code, run, serving

ErrorCodes = h2.errors.ErrorCodes


@pytest.mark.parametrize(
    "header",
    [
        ("x-split", "a\r\nb"),
        ("x-nul", "a\x00b"),
        (":status", "200"),
        ("bad name", "v"),
        ("", "v"),
        ("x-text", "caf\u00e9\u2603"),
    ],
    ids=["crlf", "nul", "pseudo-header", "space-in-name", "empty-name", "not-latin-1"],
)
def test_bad_response_header_is_refused_on_every_call(header: tuple[str, str]) -> None:
    response = Response(200, [("content-type", "text/plain"), header], b"")
    for _ in range(2):
        with pytest.raises(base.InvalidResponseError):
            base.response_headers(response)


def test_cached_headers_are_a_fresh_list_each_time() -> None:
    response = Response(201, [("Content-Type", " application/vnd.msgpack "), ("Connection", "close")])
    first = base.response_headers(response)
    first.append((b"content-length", b"9"))
    second = base.response_headers(response)
    assert second[0] == (b"content-type", b"application/vnd.msgpack")
    assert (b"content-length", b"9") not in second
    assert not any(name == b"connection" for name, _ in second)
    assert [name for name, _ in second][-2:] == [b"date", b"server"]


def test_header_cache_stays_bounded() -> None:
    for i in range(3 * base._ENCODED_HEADERS_MAX):
        base.response_headers(Response(303, [("location", f"/v1/blobs/{i}")]))
    assert len(base._encoded_headers) <= base._ENCODED_HEADERS_MAX


def test_headers_h2_would_have_normalised_are_normalised_by_the_transport() -> None:
    async def handler(request: Request) -> Response:
        if request.path == "/inject":
            return Response(200, [(":status", "500")], b"never")
        headers = [("X-Upper", "  padded  "), ("Connection", "keep-alive"), ("TE", "gzip"), ("transfer-encoding", "x")]
        return Response(200, headers, b"ok")

    async def main() -> None:
        async with serving(make_config(), handler) as server:
            client = await H2Client.connect(server.port)
            ok = await client.response(await client.request("GET", "/normalise"))
            assert (ok.status, bytes(ok.body), ok.headers["x-upper"]) == (200, b"ok", "padded")
            assert not {"connection", "te", "transfer-encoding"} & set(ok.headers)
            injected = await client.response(await client.request("GET", "/inject"))
            assert (injected.status, problem_code(injected.body)) == (500, "internal")
            # The connection survived both.
            again = await client.response(await client.request("GET", "/normalise"))
            assert again.status == 200

    run(main)


def test_transport_problems_are_counted_like_the_api_s() -> None:
    def count() -> float:
        return metrics.REGISTRY.get_sample_value("relay_problems_total", {"code": "body_too_large"}) or 0.0

    async def handler(request: Request) -> Response:
        return Response(200, [], b"")

    async def main() -> None:
        async with serving(make_config(max_body_bytes=10), handler) as server:
            client = await H2Client.connect(server.port)
            before = count()
            response = await client.response(await client.request("POST", "/x", b"a" * 11))
            assert (response.status, problem_code(response.body)) == (413, "body_too_large")
            assert count() == before + 1

    run(main)


# sha256 of h2 4.4.1's H2Connection._receive_frame source, which http2._H2Connection copies minus its eager repr.
_RECEIVE_FRAME_SHA256 = "39b2e16b4fd74ed014ca144a0c6e388aef3dc51f116d6f0a874b70d92bd92873"


def test_the_receive_frame_copy_matches_the_installed_h2() -> None:
    original = inspect.getsource(h2.connection.H2Connection._receive_frame)
    assert hashlib.sha256(original.encode()).hexdigest() == _RECEIVE_FRAME_SHA256, (
        "h2 changed H2Connection._receive_frame: compare it with relay/transport/http2.py _H2Connection, "
        "port the change (or drop the copy if h2 no longer builds repr(frame) eagerly), then update this hash"
    )
    copy = inspect.getsource(http2._H2Connection._receive_frame)
    assert "repr(" not in copy
    assert "repr(frame)" in original


def test_no_frame_repr_is_built_while_serving(monkeypatch: pytest.MonkeyPatch) -> None:
    built = 0
    original_repr = Frame.__repr__

    def counting_repr(self: Frame) -> str:
        nonlocal built
        # The test's own h2 client builds them too; count only the server's connections.
        caller = sys._getframe(1).f_locals.get("self")
        if isinstance(caller, h2.connection.H2Connection) and not caller.config.client_side:
            built += 1
        return original_repr(self)

    monkeypatch.setattr(Frame, "__repr__", counting_repr)

    async def handler(request: Request) -> Response:
        return Response(201, [("content-type", "application/vnd.msgpack")], b"\x80")

    async def main() -> None:
        async with serving(make_config(), handler) as server:
            client = await H2Client.connect(server.port)
            for _ in range(3):
                assert (await client.response(await client.request("POST", "/v1/messages", b"x" * 300))).status == 201

    run(main)
    assert built == 0
