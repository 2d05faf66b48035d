"""What every handler gets besides its :class:`~relay.api.routing.Call`: the relay's services and settings."""

from __future__ import annotations

from typing import TYPE_CHECKING

from protocol.messages import WellKnown
from relay import metrics

if TYPE_CHECKING:
    from relay.services import Services


class Api:
    """One relay's services, discovery document and API settings, shared by all handlers.

    ``ready`` is what ``/readyz`` answers (and the ``relay_ready`` gauge).
    ``openapi_document`` is set by the application that serves the route
    table (``GET /openapi.json`` answers it).
    """

    def __init__(self, services: Services, well_known: WellKnown, heartbeat_seconds: float) -> None:
        self.services = services
        self.well_known = well_known
        self.heartbeat_seconds = heartbeat_seconds
        self.openapi_document = b""
        self._ready = False

    @property
    def ready(self) -> bool:
        return self._ready

    @ready.setter
    def ready(self, value: bool) -> None:
        self._ready = value
        metrics.ready.set(1 if value else 0)
