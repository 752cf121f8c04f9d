"""The transport error vocabulary (re-exported from `transport.base` and `transport`).

Every failure a transport user can see is one of these; OS errors (`OSError`, `posix_ipc`
errors, anyio stream errors) are translated at the boundary and never leak.
"""

from __future__ import annotations


class TransportError(Exception):
    """Base class of every error raised by the transport package."""


class TransportClosed(TransportError):
    """This end was closed (by us), or the peer closed the link in an orderly way."""


class TransportBroken(TransportError):
    """The peer died, the link failed, or the bytes received are not a valid message."""


class MessageTooLarge(TransportError):
    """A message (or a received frame header) exceeds the configured maximum size."""


class AuthenticationError(TransportError):
    """The peer failed (or refused) the shared-token challenge/response."""
