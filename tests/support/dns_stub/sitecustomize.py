"""A resolver answer for a relay process under test, without a DNS server: Python imports this module at start-up
when its directory is on ``PYTHONPATH`` (:func:`tests.support.dns_stub.env` puts it there).

``DNS_STUB_ERRORS="no-such-relay.example=EAI_NONAME,dns-down.example=EAI_AGAIN"`` makes ``socket.getaddrinfo``
fail for those names (and their subdomains) with that ``socket.gaierror``, as the system resolver does for a name
that does not exist (NXDOMAIN) or when the DNS server does not answer. Every other lookup, and every numeric-only
lookup (trio tries one first for each name), goes to the real resolver. So what the relay's own code does with
the answer is tested as it runs, whatever the machine's DNS answers for those names (an offline machine says
``EAI_AGAIN`` for every name).
"""

from __future__ import annotations

import os
import socket
from typing import Any

_MESSAGES = {
    "EAI_NONAME": "Name or service not known",
    "EAI_NODATA": "No address associated with hostname",
    "EAI_AGAIN": "Temporary failure in name resolution",
    "EAI_FAIL": "Non-recoverable failure in name resolution",
}
_RULES: dict[str, tuple[int, str]] = {}
for _entry in filter(None, os.environ.get("DNS_STUB_ERRORS", "").split(",")):
    _name, _, _error = _entry.partition("=")
    _RULES[_name.strip().lower().rstrip(".")] = (getattr(socket, _error.strip()), _MESSAGES[_error.strip()])

_real_getaddrinfo = socket.getaddrinfo


def _stubbed(host: object) -> tuple[int, str] | None:
    name = host.decode("ascii", "replace") if isinstance(host, bytes) else str(host)
    labels = name.lower().rstrip(".").split(".")
    return next((_RULES[s] for s in (".".join(labels[i:]) for i in range(len(labels))) if s in _RULES), None)


def _getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
    flags = args[3] if len(args) > 3 else kwargs.get("flags", 0)
    answer = None if flags & socket.AI_NUMERICHOST else _stubbed(host)
    if answer is not None:
        raise socket.gaierror(*answer)
    return _real_getaddrinfo(host, port, *args, **kwargs)


if _RULES:
    socket.getaddrinfo = _getaddrinfo
