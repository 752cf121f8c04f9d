"""The chat page at `GET /`: static HTML, CSS and JavaScript shipped inside the package.

    install_ui(app)      # GET / and GET /ui/<file>; UI_PATHS need no API key

No build step and nothing fetched from elsewhere: the three files in `static/` are the whole
page, served with a Content-Security-Policy that lets it load only from this server (no inline
script or style, no other origin), so it works offline and a model's text can never run as
code. The page talks to the server's own endpoints (/v1/models, streamed
/v1/chat/completions, /metrics), with the API key the user types when the server asks for one.
"""

from __future__ import annotations

from importlib import resources

from fastapi import FastAPI
from fastapi.responses import Response

STATIC_FILES: dict[str, str] = {
    "index.html": "text/html; charset=utf-8",
    "chat.css": "text/css; charset=utf-8",
    "chat.js": "text/javascript; charset=utf-8",
}
"""The page's files (in `engine/server/static/`) and their content types."""

UI_PATHS: tuple[str, ...] = ("/", *(f"/ui/{name}" for name in STATIC_FILES if name != "index.html"))
"""The paths the page is served under; open without the API key (the page asks for it)."""

CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def _read(name: str) -> bytes:
    return resources.files("shardline.engine.server").joinpath("static", name).read_bytes()


def install_ui(app: FastAPI) -> None:
    """Serve the chat page at `/` and its assets at `/ui/<file>` (read once, now)."""
    contents = {name: _read(name) for name in STATIC_FILES}

    def send(name: str) -> Response:
        return Response(contents[name], media_type=STATIC_FILES[name], headers=_HEADERS)

    @app.get("/", include_in_schema=False)
    async def chat_page() -> Response:
        return send("index.html")

    @app.get("/ui/chat.css", include_in_schema=False)
    async def chat_css() -> Response:
        return send("chat.css")

    @app.get("/ui/chat.js", include_in_schema=False)
    async def chat_js() -> Response:
        return send("chat.js")
