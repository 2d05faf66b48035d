"""The relay's HTTP transport: HTTP/1.1 (h11) and HTTP/2 (h2) on one trio listener.

The only package that imports h2/h11. It turns connections into
:class:`relay.api.http.Request` objects for one :data:`relay.api.http.Handler`
and enforces the limits of DESIGN.md §7.
"""

from relay.transport.base import TransportStatistics
from relay.transport.server import Server

__all__ = ["Server", "TransportStatistics"]
