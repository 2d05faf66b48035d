"""This account's verified device list, as the sync engine's parts judge writers, grants and rotations by it."""

from __future__ import annotations

from typing import Final

import trio

from ... import device_list
from ...messages import DeviceEntry
from .base import Context, Part, guarded

#: How long the verified list is reused before it is fetched again.
DEVICE_LIST_REFRESH_SECONDS: Final = 30.0


class DeviceLists(Part):
    """The verified device list of this device's account, cached for :data:`DEVICE_LIST_REFRESH_SECONDS`.

    Owns the cache (version and devices of the newest list, its format, when it was fetched); the chain itself is
    verified by the SDK (``RelayClient.device_chain``)."""

    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx)
        self._chain: tuple[int, list[DeviceEntry]] | None = None
        self._fetched_at = 0.0
        #: The format of the newest verified list (device_list.FORMAT_1 until one was fetched).
        self.list_format = device_list.FORMAT_1

    async def current(self, fresh: bool = False) -> tuple[int, list[DeviceEntry]]:
        """(version, verified devices) of this account's latest device list; ``fresh`` fetches it again.

        Raises :class:`~protocol.client.engine.base.RetryError` / ``RevokedError`` (this device left the list) and
        what a list that does not verify raises. Idempotent; cancellation leaves the cache as it was."""
        if self._chain is None or fresh or trio.current_time() - self._fetched_at > DEVICE_LIST_REFRESH_SECONDS:
            verified = await guarded(self._relay.device_chain(self._keys.account_id))
            self._chain = (verified.head.version, verified.devices)
            self.list_format = verified.head.format
            self._fetched_at = trio.current_time()
        return self._chain

    def cached_devices(self) -> list[DeviceEntry] | None:
        """The devices of the list :meth:`current` last returned (None: none fetched yet); no I/O."""
        return self._chain[1] if self._chain is not None else None

    async def at(self, version: int) -> list[DeviceEntry] | None:
        """The verified devices of version ``version`` of this account's list (None: no such version). Raises
        like :meth:`current`."""
        return await guarded(self._relay.list_at(self._keys.account_id, version))


__all__ = ["DEVICE_LIST_REFRESH_SECONDS", "DeviceLists"]
