"""OpenAI-compatible HTTP server: `build_app(engine, served_model_name=..., api_key=...)`."""

from engine.server.app import build_app
from engine.server.middleware import DEFAULT_MAX_BODY_BYTES

__all__ = ["DEFAULT_MAX_BODY_BYTES", "build_app"]
