"""The browser client's files at ``/`` (relay/api/web.py), their headers, the settings, and CORS.

In-process tests drive the real :class:`Application` (router, HEAD, 405, metrics) with the web routes
and :class:`CorsGate` in front of it; the process tests check the same over the wire against
``tetherless serve``, and that a bad ``web_dist`` stops the relay with a clear message. The browser's
side (the CSP enforced, CORS between two relays) is tests/web/test_browser_shell.py.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from relay import app as app_mod
from relay import config as config_mod
from relay.api import web
from relay.api.application import Application
from relay.api.context import Api
from relay.api.http import Request, Response
from relay.api.routes import all_routes
from tests.e2e.http11 import Http11
from tests.relay_process import RelayProcess

APP_ORIGIN = "http://localhost:8081"


def _tree(root: Path, files: dict[str, bytes]) -> Path:
    for name, body in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(body)
    return root


SHELL = {"index.html": b"<!doctype html><title>t</title>", "app.js": b"export {};", "icons/a.svg": b"<svg/>"}


def _application(directory: Path) -> Application:
    client = web.WebClient.load(directory)
    # Neither the web routes nor /livez use the services or the discovery document.
    return Application(Api(None, None, 1.0), all_routes(), unlisted=client.routes)  # type: ignore[arg-type]


def _request(method: str, path: str, **headers: str) -> Request:
    return Request(method, path, "", tuple(headers.items()), b"", "127.0.0.1:1", "1.1")


def _problem_code(response: Response) -> str:
    assert response.headers[0] == ("content-type", "application/problem+json"), response.headers
    return str(json.loads(response.body)["code"])


# -- reading the build ---------------------------------------------------------------------------------------


def test_every_file_is_served_at_its_own_path_and_index_at_the_root(tmp_path: Path) -> None:
    _tree(tmp_path, {**SHELL, ".hidden.js": b"no", ".cache/x.js": b"no"})
    assets = web.read_assets(tmp_path)
    assert sorted(assets) == ["/", "/app.js", "/icons/a.svg", "/index.html"]
    assert assets["/"] is assets["/index.html"]
    assert assets["/app.js"].content_type == "text/javascript; charset=utf-8"
    assert assets["/icons/a.svg"].content_type == "image/svg+xml"
    assert assets["/"].content_type == "text/html; charset=utf-8"
    assert len({asset.etag for asset in assets.values()}) == 3  # one per content


@pytest.mark.parametrize(
    ("files", "reason"),
    [
        ({"app.js": b""}, "no index.html"),
        ({**SHELL, "my app.js": b""}, "my app.js: a file name must be"),
        ({**SHELL, "caf\u00e9.js": b""}, "a file name must be"),
        ({**SHELL, "run.sh": b""}, "run.sh: unknown type '.sh'"),
        ({**SHELL, "LICENSE": b""}, "LICENSE: unknown type '(no extension)'"),
    ],
)
def test_a_directory_that_is_not_a_client_build_is_refused(
    tmp_path: Path, files: dict[str, bytes], reason: str
) -> None:
    with pytest.raises(web.WebClientError, match=reason.replace("(", r"\(").replace(")", r"\)")):
        web.read_assets(_tree(tmp_path, files))


def test_limits_on_what_is_held_in_memory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _tree(tmp_path, SHELL)
    with pytest.raises(web.WebClientError, match="not a directory"):
        web.read_assets(tmp_path / "index.html")
    monkeypatch.setattr(web, "MAX_FILES", 2)
    with pytest.raises(web.WebClientError, match="more than 2 files"):
        web.read_assets(tmp_path)
    monkeypatch.setattr(web, "MAX_FILES", 10)
    monkeypatch.setattr(web, "MAX_TOTAL_BYTES", 20)
    with pytest.raises(web.WebClientError, match="more than 20 bytes"):
        web.read_assets(tmp_path)


def test_a_file_may_not_hide_an_api_route(tmp_path: Path) -> None:
    _tree(tmp_path, {**SHELL, "openapi.json": b"{}"})
    reserved = {route.template for route in all_routes()}
    with pytest.raises(web.WebClientError, match=r"openapi.json: the relay's API already answers /openapi.json"):
        web.WebClient.load(tmp_path, reserved_paths=reserved)


def test_the_policy_names_only_this_origin_and_the_configured_relays() -> None:
    headers = dict(web.security_headers())
    assert "connect-src 'self';" in headers["content-security-policy"]
    assert "unsafe" not in headers["content-security-policy"]
    policy = dict(web.security_headers(["https://b.example", "http://localhost:9"]))["content-security-policy"]
    assert "connect-src 'self' https://b.example http://localhost:9;" in policy
    assert policy.replace(" https://b.example http://localhost:9", "") == headers["content-security-policy"]


# -- serving (the real application, in process) ------------------------------------------------------------


async def test_get_head_and_revalidation(tmp_path: Path) -> None:
    application = _application(_tree(tmp_path, SHELL))
    page = await application(_request("GET", "/"))
    assert (page.status, page.body) == (200, SHELL["index.html"])
    headers = dict(page.headers)
    assert headers["content-type"] == "text/html; charset=utf-8"
    assert headers["cache-control"] == "no-cache"
    assert dict(web.security_headers()).items() <= headers.items()
    head = await application(_request("HEAD", "/app.js"))
    assert head.status == 200  # the transport drops the body of a HEAD answer and keeps its length
    assert dict(head.headers)["content-type"] == "text/javascript; charset=utf-8"
    etag = dict(head.headers)["etag"]
    for tags in (etag, f"W/{etag}", f'"other", {etag}', "*"):
        fresh = await application(_request("GET", "/app.js", **{"if-none-match": tags}))
        assert (fresh.status, fresh.body, dict(fresh.headers)["etag"]) == (304, b"", etag), tags
        assert "content-security-policy" in dict(fresh.headers)
    stale = await application(_request("GET", "/app.js", **{"if-none-match": '"other"'}))
    assert (stale.status, stale.body) == (200, SHELL["app.js"])


@pytest.mark.parametrize(
    "path",
    [
        "/../app.js",
        "/%2e%2e/app.js",
        "/icons/../app.js",
        "/icons",
        "/icons/",
        "//app.js",
        "/app.js/",
        "/APP.JS",
        "/app.js%00",
        "/.hidden.js",
        "/web/dist/app.js",
        "/pyproject.toml",
    ],
)
async def test_only_the_exact_path_of_a_built_file_is_served(tmp_path: Path, path: str) -> None:
    application = _application(_tree(tmp_path, {**SHELL, ".hidden.js": b"no"}))
    assert _problem_code(await application(_request("GET", path))) == "not_found"


async def test_other_methods_are_refused(tmp_path: Path) -> None:
    application = _application(_tree(tmp_path, SHELL))
    for method in ("POST", "PUT", "DELETE", "OPTIONS"):
        refused = await application(_request(method, "/app.js"))
        assert (refused.status, _problem_code(refused), dict(refused.headers)["allow"]) == (
            405,
            "method_not_allowed",
            "GET",
        )


def test_the_api_document_leaves_the_client_out(tmp_path: Path) -> None:
    application = _application(_tree(tmp_path, SHELL))
    paths = json.loads(application.api.openapi_document)["paths"]
    assert "/.well-known/tetherless" in paths
    assert not {"/", "/app.js", "/index.html", "/icons/a.svg"} & set(paths)
    # The committed document is generated from all_routes(), which never holds the client's routes.
    assert all(route.tag != "web" for route in all_routes())


# -- CORS ----------------------------------------------------------------------------------------------------


def _gate(tmp_path: Path) -> web.CorsGate:
    return web.CorsGate(_application(_tree(tmp_path, SHELL)), [APP_ORIGIN], {"GET", "POST", "PUT", "DELETE"})


async def test_a_listed_origin_gets_its_preflight_and_cors_headers_on_every_answer(tmp_path: Path) -> None:
    gate = _gate(tmp_path)
    preflight = await gate(
        _request(
            "OPTIONS",
            "/v1/inbox",
            origin=APP_ORIGIN,
            **{"access-control-request-method": "GET", "access-control-request-headers": "authorization"},
        )
    )
    assert preflight.status == 204
    assert dict(preflight.headers) == {
        "access-control-allow-origin": APP_ORIGIN,
        "access-control-allow-methods": "DELETE, GET, HEAD, POST, PUT",
        "access-control-allow-headers": web.CORS_ALLOWED_HEADERS,
        "access-control-max-age": "600",
        "cache-control": "no-store",
        "vary": "origin",
    }
    for path, status in (("/livez", 200), ("/no-such-path", 404)):  # problems too: the page reads their code
        answer = await gate(_request("GET", path, origin=APP_ORIGIN))
        assert answer.status == status
        assert dict(answer.headers)["access-control-allow-origin"] == APP_ORIGIN
        exposed = dict(answer.headers)["access-control-expose-headers"].split(", ")
        assert {"retry-after", "upload-offset", "location", "tetherless-blob-id", "content-range"} <= set(exposed)
        assert ("vary", "origin") in answer.headers
    assert "access-control-allow-credentials" not in dict(preflight.headers)  # tokens are headers, not cookies


async def test_other_origins_get_what_they_got_before(tmp_path: Path) -> None:
    gate = _gate(tmp_path)
    for origin in ("http://localhost:8082", "https://localhost:8081", "null"):
        preflight = await gate(
            _request("OPTIONS", "/v1/inbox", origin=origin, **{"access-control-request-method": "GET"})
        )
        assert (preflight.status, _problem_code(preflight)) == (405, "method_not_allowed")
        answer = await gate(_request("GET", "/livez", origin=origin))
        assert answer.status == 200
        assert not any(name.startswith("access-control-") for name, _ in answer.headers + preflight.headers)
        assert ("vary", "origin") in answer.headers  # a cache must not hand this answer to a listed origin
    unknown_method = await gate(
        _request("OPTIONS", "/v1/inbox", origin=APP_ORIGIN, **{"access-control-request-method": "PATCH"})
    )
    assert unknown_method.status == 405  # not a 2xx with allowed methods: the browser's preflight fails
    assert "access-control-allow-methods" not in dict(unknown_method.headers)


# -- settings --------------------------------------------------------------------------------------------------


def test_settings_from_env_file_and_flags(tmp_path: Path) -> None:
    config, _ = config_mod.load(env={})
    assert (config.web_client, config.web_dist, config.cors_allowed_origins) == (True, "", "")
    config, sources = config_mod.load(env={"TETHERLESS_WEB_CLIENT": "off"})
    assert (config.web_client, sources["web_client"]) == (False, "env TETHERLESS_WEB_CLIENT")
    toml = tmp_path / "relay.toml"
    toml.write_text('cors_allowed_origins = ["https://app.example.org", "http://localhost:8081"]\n')
    config, _ = config_mod.load(env={}, file=str(toml))
    assert config_mod.origin_list(config.cors_allowed_origins) == ("https://app.example.org", "http://localhost:8081")
    shown = subprocess.run(
        [sys.executable, "-m", "tetherless_cli", "config", "show", "--no-web-client", "--web-dist", str(tmp_path)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    assert any(line.split()[:2] == ["web_client", "False"] and "(flag)" in line for line in shown.splitlines())
    assert any(line.startswith("web_dist ") and "(flag)" in line for line in shown.splitlines())


@pytest.mark.parametrize(
    "origin",
    ["*", "https://app.example.org/", "https://App.example.org", "https://app.example.org:443", "app.example.org"],
)
def test_origins_must_be_written_as_browsers_send_them(origin: str) -> None:
    for name in config_mod.ORIGIN_LISTS:
        with pytest.raises(config_mod.ConfigError, match=f"{name}: expected origins as browsers send them"):
            config_mod.load(env={f"TETHERLESS_{name.upper()}": f"http://localhost:1,{origin}"})


def test_no_build_at_the_default_place_serves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An installed wheel has no web/dist: the relay runs, logs why / is empty, and answers 404 there."""
    monkeypatch.setattr(app_mod, "CHECKOUT_DIST", tmp_path / "web" / "dist")
    config, _ = config_mod.load(env={})
    with caplog.at_level(logging.WARNING, logger="relay.app"):
        assert app_mod.load_web_client(config, set()) is None
    assert "no build at" in caplog.text
    assert app_mod.load_web_client(config_mod.replace(config, web_client=False), set()) is None


# -- over the wire ---------------------------------------------------------------------------------------------


def test_a_relay_serves_the_committed_build(tmp_path: Path) -> None:
    relay = RelayProcess(tmp_path / "data")
    relay.start()
    try:
        client = Http11(relay.url)
        page = client.get("/", accept="text/html")
        assert page.status == 200
        assert page.body == (web.CHECKOUT_DIST / "index.html").read_bytes()
        assert "script-src 'self'" in page.headers["content-security-policy"]
        head = client.request("HEAD", "/app.js")
        assert (head.status, head.body) == (200, b"")
        assert int(head.headers["content-length"]) == (web.CHECKOUT_DIST / "app.js").stat().st_size
        again = client.request("GET", "/app.js", headers={"if-none-match": head.headers["etag"]})
        assert (again.status, again.body) == (304, b"")
        for raw in ("/../pyproject.toml", "/%2e%2e/pyproject.toml", "/web/dist/app.js", "/index.html/.."):
            assert client.get(raw).code == "not_found", raw
        assert "/" not in client.get("/openapi.json").json()["paths"]
        built = sum(1 for path in web.CHECKOUT_DIST.iterdir() if path.is_file())
        assert f"web client: serving {built} files from" in relay.logs()
    finally:
        assert relay.stop() == 0


def test_the_flag_turns_it_off_and_another_directory_can_be_served(tmp_path: Path) -> None:
    off = RelayProcess(tmp_path / "off", extra_args=["--no-web-client"])
    other = RelayProcess(
        tmp_path / "other",
        env={"TETHERLESS_WEB_DIST": str(_tree(tmp_path / "build", SHELL))},
    )
    off.start()
    other.start()
    try:
        missing = Http11(off.url).get("/", accept="text/html")
        assert (missing.status, missing.code) == (404, "not_found")
        assert "web client: off" in off.logs()
        served = Http11(other.url)
        assert served.get("/icons/a.svg", accept="image/*").body == b"<svg/>"
        assert served.get("/").body == SHELL["index.html"]
    finally:
        assert off.stop() == 0
        assert other.stop() == 0


def test_an_unusable_web_dist_stops_the_relay_with_the_reason(tmp_path: Path) -> None:
    _tree(tmp_path / "build", {**SHELL, "notes.md": b"# not part of a build"})
    for directory, reason in ((tmp_path / "nothing", "not a directory"), (tmp_path / "build", "notes.md")):
        relay = RelayProcess(tmp_path / f"data-{directory.name}", extra_args=["--web-dist", str(directory)])
        with pytest.raises(RuntimeError, match="relay exited before ready"):
            relay.start()
        assert f"tetherless: error: web_dist {directory}: " in relay.logs()
        assert reason in relay.logs()
        assert "Traceback" not in relay.logs()


def test_cors_over_the_wire(tmp_path: Path) -> None:
    relay = RelayProcess(tmp_path / "data", env={"TETHERLESS_CORS_ALLOWED_ORIGINS": APP_ORIGIN})
    relay.start()
    try:
        client = Http11(relay.url)
        ask = {"origin": APP_ORIGIN, "access-control-request-method": "POST"}
        preflight = client.request("OPTIONS", "/v1/messages", headers=ask)
        assert (preflight.status, preflight.headers["access-control-allow-origin"]) == (204, APP_ORIGIN)
        refused = client.request("OPTIONS", "/v1/messages", headers={**ask, "origin": "http://localhost:1"})
        assert (refused.status, refused.code) == (405, "method_not_allowed")
        assert "access-control-allow-origin" not in refused.headers
        problem = client.request(
            "POST", "/v1/messages", b"{}", {"origin": APP_ORIGIN, "content-type": "application/json"}
        )
        assert (problem.code, problem.headers["access-control-allow-origin"]) == ("missing_token", APP_ORIGIN)
    finally:
        assert relay.stop() == 0
