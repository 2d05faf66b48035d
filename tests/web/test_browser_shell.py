"""The browser client served by a real relay process, in headless chromium: the shell, its headers, its policy.

What a browser must see (docs/operations.md "Web client"): the app at ``/`` with no console error and no
CSP violation; a Content-Security-Policy the browser really enforces (an injected inline script, inline
style, inline handler, foreign image, foreign fetch and string-to-HTML sink are all refused); nothing at
``/`` when the setting is off; and another relay's API reachable from the app only when that relay lists
the app's origin in ``cors_allowed_origins`` (and the serving relay lists it in ``web_connect_origins``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tests.web.conftest import WatchedPage, localhost, screenshot

if TYPE_CHECKING:
    from playwright.sync_api import Route

# The headers every answer of the browser client carries (relay/api/web.py); the CSP is checked by value.
SECURITY_HEADERS = {
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cross-origin-opener-policy": "same-origin",
    "cross-origin-resource-policy": "same-origin",
    "permissions-policy": "camera=(), microphone=(), geolocation=(), payment=(), usb=()",
    "cache-control": "no-cache",
}
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "manifest-src 'self'; worker-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'; "
    "require-trusted-types-for 'script'"
)

FETCH = """async ([url, headers]) => {
  try {
    const response = await fetch(url, { headers });
    return { status: response.status, body: await response.json() };
  } catch (error) {
    return { error: error.name };
  }
}"""


def test_the_relay_serves_the_app_shell(watched: WatchedPage, start_relay: Any) -> None:
    relay = start_relay()
    page = watched.page
    response = page.goto(localhost(relay.url) + "/")
    assert response is not None
    assert response.status == 200
    headers = response.headers
    assert headers["content-type"] == "text/html; charset=utf-8"
    assert headers["content-security-policy"] == CSP
    assert {name: headers.get(name) for name in SECURITY_HEADERS} == SECURITY_HEADERS
    assert headers["etag"].startswith('"')
    page.get_by_role("heading", name="Tetherless").wait_for()
    # app.js ran (the CSP let this origin's script in) and found a secure context: WebCrypto is usable here.
    status = page.get_by_role("status")
    assert status.inner_text() == "This browser can run the Tetherless client."
    assert page.locator("#version").inner_text().startswith("Tetherless web ")
    assert page.evaluate("isSecureContext && typeof crypto.subtle.generateKey === 'function'")
    assert page.title() == "Tetherless"
    watched.assert_clean()
    shot = screenshot(page, "shell")
    assert shot.stat().st_size > 1000


def test_the_browser_enforces_the_policy(watched: WatchedPage, start_relay: Any) -> None:
    """Markup injected into the relay's page (as an XSS would) runs nothing and loads nothing foreign."""
    relay = start_relay()
    page = watched.page
    origin = localhost(relay.url)
    injected = (
        "<script>window.__ran = 'inline script'</script>"
        "<style>body { display: none }</style>"
        "<img src='data:,' onerror=\"window.__ran = 'handler'\">"
        "<img src='http://127.0.0.1:9/tracker.png'>"
    )

    def inject(route: Route) -> None:
        real = route.fetch()  # the relay's own answer, headers and all: only the body is tampered with
        route.fulfill(response=real, body=real.text().replace("</main>", injected + "</main>"))

    page.route(origin + "/", inject)
    page.goto(origin + "/")
    page.get_by_role("status").filter(has_text="can run").wait_for()  # app.js, from 'self', still runs
    assert page.evaluate("window.__ran") is None
    assert page.evaluate("getComputedStyle(document.body).display") != "none"
    sink = "() => { try { document.body.innerHTML = '<b>x</b>'; return 'assigned' } catch (e) { return e.name } }"
    assert page.evaluate(sink) == "TypeError"  # Trusted Types: a string never becomes markup
    assert page.evaluate(FETCH, ["http://127.0.0.1:9/", {}]) == {"error": "TypeError"}
    page.wait_for_function("window.__cspViolations.length >= 6")
    assert set(watched.csp_violations()) == {
        "connect-src http://127.0.0.1:9/",
        "img-src http://127.0.0.1:9/tracker.png",
        "require-trusted-types-for trusted-types-sink",
        "script-src-attr inline",
        "script-src-elem inline",
        "style-src-elem inline",
    }


def test_no_app_when_the_setting_is_off(watched: WatchedPage, start_relay: Any) -> None:
    relay = start_relay(env={"TETHERLESS_WEB_CLIENT": "false"})
    response = watched.page.goto(localhost(relay.url) + "/")
    assert response is not None
    assert (response.status, response.headers["content-type"]) == (404, "application/problem+json")
    assert response.json()["code"] == "not_found"
    assert watched.page.request.get(localhost(relay.url) + "/app.js").status == 404


def test_another_relays_api_needs_its_cors_setting(watched: WatchedPage, start_relay: Any) -> None:
    """The app served by relay A calls relay B (which lists A's origin) but not relay C (which does not)."""
    app = start_relay("a")
    app_origin = localhost(app.url)
    listed = start_relay("b", env={"TETHERLESS_CORS_ALLOWED_ORIGINS": app_origin})
    unlisted = start_relay("c")
    # A's own policy must let its page reach B and C at all (web_connect_origins): restart A, same port.
    app.stop()
    app.env = {"TETHERLESS_WEB_CONNECT_ORIGINS": f"{localhost(listed.url)},{localhost(unlisted.url)}"}
    app.start()
    page = watched.page
    page.goto(app_origin + "/")
    page.get_by_role("status").filter(has_text="can run").wait_for()

    simple = page.evaluate(FETCH, [localhost(listed.url) + "/.well-known/tetherless", {"accept": "application/json"}])
    assert simple["status"] == 200
    assert simple["body"]["relay"] == listed.name
    # Authorization is not a CORS-safelisted header: the browser asks first (OPTIONS), then sends the request,
    # and the page can read B's problem (CORS headers are on errors too).
    preflighted = page.evaluate(FETCH, [localhost(listed.url) + "/v1/inbox", {"authorization": "Bearer nope"}])
    assert (preflighted["status"], preflighted["body"]["code"]) == (401, "invalid_token")

    refused = page.evaluate(FETCH, [localhost(unlisted.url) + "/.well-known/tetherless", {}])
    assert refused == {"error": "TypeError"}
    assert watched.csp_violations() == []  # A's policy allowed the call; C's missing CORS header refused it
    assert any("CORS policy" in line for line in watched.console), watched.console
