"""The chat page at `/` without a browser: what is served, its headers, --no-ui, the API-key rule.

The page in a real browser against a real server: tests/server/test_ui_browser.py.
"""

from __future__ import annotations

import pathlib
import re

import httpx
import pytest

from server.fake_engine import FakeEngine
from server.helpers import asgi_client, assert_openai_error
from server.process import fake_serve_command, server_process
from shardline.engine.server import build_app
from shardline.engine.server.ui import CONTENT_SECURITY_POLICY, STATIC_FILES, UI_PATHS

STATIC = pathlib.Path(__file__).resolve().parents[2] / "src" / "engine" / "server" / "static"
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}


def test_the_policy_allows_this_server_only() -> None:
    directives = dict(d.strip().split(" ", 1) for d in CONTENT_SECURITY_POLICY.split(";"))
    assert directives["default-src"] == "'self'"
    for name in ("script-src", "style-src", "connect-src"):
        assert directives[name] == "'self'", name  # no 'unsafe-inline', no other origin
    assert directives["object-src"] == "'none'"
    assert directives["frame-ancestors"] == "'none'"


async def test_the_page_its_assets_and_their_headers() -> None:
    app = build_app(FakeEngine(), served_model_name="m", api_key=None)
    async with asgi_client(app) as client:
        page = await client.get("/")
        assert page.status_code == 200
        assert page.headers["content-type"] == "text/html; charset=utf-8"
        assert page.text == (STATIC / "index.html").read_text()
        for path, content_type in (
            ("/ui/chat.js", "text/javascript"),
            ("/ui/chat.css", "text/css"),
        ):
            asset = await client.get(path)
            assert asset.status_code == 200, path
            assert asset.headers["content-type"] == f"{content_type}; charset=utf-8"
            assert asset.content == (STATIC / path.removeprefix("/ui/")).read_bytes()
        for response in (page, asset):
            assert response.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
            assert response.headers["x-content-type-options"] == "nosniff"
        for missing in ("/ui/", "/ui/index.html", "/ui/../app.py", "/ui/chat.jsx", "/index.html"):
            assert (await client.get(missing)).status_code == 404, missing
        # Not in the API's schema: the page is not part of the OpenAI API.
        assert "/" not in (await client.get("/openapi.json")).json()["paths"]


def test_the_page_loads_nothing_from_elsewhere_and_nothing_inline() -> None:
    """Every src/href of the page is one of its own files (or an empty data: icon); no inline
    script or style (the policy would block them); the CSS imports nothing; the script names
    no other origin."""
    html = (STATIC / "index.html").read_text()
    refs = re.findall(r"""(?:src|href)\s*=\s*["']([^"']*)["']""", html)
    assert sorted(refs) == ["/ui/chat.css", "/ui/chat.js", "data:,"]
    assert all(path in UI_PATHS for path in refs if path.startswith("/"))
    assert re.findall(r"<script\b[^>]*>", html) == ['<script src="/ui/chat.js" defer>']
    assert (
        "<style" not in html and " style=" not in html and re.search(r"\son\w+\s*=", html) is None
    )
    css = (STATIC / "chat.css").read_text()
    assert "@import" not in css and "url(" not in css
    js = (STATIC / "chat.js").read_text()
    assert re.search(r"""["'`](https?:)?//""", js) is None
    assert sorted(STATIC_FILES) == sorted(p.name for p in STATIC.iterdir())


async def test_no_ui_answers_404_as_vllm() -> None:
    app = build_app(FakeEngine(), served_model_name="m", api_key=None, ui=False)
    async with asgi_client(app) as client:
        for path in UI_PATHS:
            assert (await client.get(path)).status_code == 404, path
        response = await client.post("/v1/chat/completions", json=CHAT)
        assert response.status_code == 200, response.text


async def test_with_a_key_only_the_page_and_health_answer_without_it() -> None:
    app = build_app(FakeEngine(), served_model_name="m", api_key="sk-ui")
    async with asgi_client(app) as client:
        for path in UI_PATHS:
            assert (await client.get(path)).status_code == 200, path
        assert (await client.get("/health")).status_code == 200
        for method, path in (
            ("GET", "/v1/models"),
            ("POST", "/v1/chat/completions"),
            ("POST", "/v1/completions"),
            ("POST", "/tokenize"),
            ("GET", "/version"),
            ("GET", "/ui/other.js"),
            ("GET", "/x"),
        ):
            response = await client.request(method, path, json=CHAT if method == "POST" else None)
            assert_openai_error(response, 401, code="invalid_api_key")
        keyed = {"Authorization": "Bearer sk-ui"}
        assert (await client.get("/v1/models", headers=keyed)).json()["data"][0]["id"] == "m"
        response = await client.post("/v1/chat/completions", json=CHAT, headers=keyed)
        assert response.status_code == 200, response.text


async def test_with_a_key_and_no_ui_the_root_needs_the_key_like_any_other_path() -> None:
    app = build_app(FakeEngine(), served_model_name="m", api_key="sk-ui", ui=False)
    async with asgi_client(app) as client:
        assert_openai_error(await client.get("/"), 401)
        assert (await client.get("/", headers={"Authorization": "Bearer sk-ui"})).status_code == 404


@pytest.mark.parametrize("flags, page_status", [((), 200), (("--no-ui",), 404)])
def test_serve_flag_no_ui(tmp_path: pathlib.Path, flags: tuple[str, ...], page_status: int) -> None:
    """`shardline serve` (the fake engine behind it) serves the page unless --no-ui; with a key
    from the environment the page is open, the API is not."""
    with server_process(
        fake_serve_command("--served-model-name", "m", *flags),
        tmp_path,
        env={"SHARDLINE_API_KEY": "sk-env"},
    ) as server:
        server.wait_healthy(60)
        keyed = {"Authorization": "Bearer sk-env"}
        page = httpx.get(server.base_url + "/", headers=keyed)
        assert page.status_code == page_status, page.text
        if page_status == 200:
            page = httpx.get(server.base_url + "/")
            assert page.status_code == 200
            assert page.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
            assert "<title>shardline</title>" in page.text
        assert_openai_error(httpx.get(server.base_url + "/v1/models"), 401)
        assert httpx.get(server.base_url + "/v1/models", headers=keyed).status_code == 200
        assert ("(OpenAI API under /v1; chat page at /)" in server.log()) == (page_status == 200)
        assert server.stop() == 0
