"""OpenAI-compatible HTTP server: `build_app(engine, served_model_name=..., api_key=...)`."""

from shardline.engine.server.app import build_app
from shardline.engine.server.middleware import DEFAULT_MAX_BODY_BYTES

__all__ = ["DEFAULT_MAX_BODY_BYTES", "build_app"]
