"""The relay's route table: every topic module's routes, in one list.

Each topic module (one per resource family) declares its routes on its
handlers with :meth:`relay.api.routing.RouteTable.route`; nothing else
declares routes. Order does not matter: templates never overlap, and the
router refuses a method and path declared twice.
"""

from __future__ import annotations

from . import account_log, accounts, blobs, devices, enrolment, federation, messages, ops, prekeys, webauthn
from .routing import Route

TOPICS = (ops, accounts, devices, webauthn, messages, account_log, prekeys, enrolment, blobs, federation)


def all_routes(*, metrics: bool = True) -> list[Route]:
    """A fresh list of every route the relay serves (the OpenAPI document is generated from it).

    ``metrics=False`` leaves out ``GET /metrics`` (served by its own listener instead).
    """
    return [route for topic in TOPICS for route in topic.ROUTES.routes if metrics or route.endpoint is not ops.metrics]
