"""Errors the model layer raises for bad input: each message names what was wrong."""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint is missing a tensor, has one of the wrong shape, or cannot be read."""


class UnknownArchitectureError(ValueError):
    """No model is registered under the requested architecture name."""


class ModelInterfaceError(TypeError):
    """A registered model does not answer the interface the workers call."""
