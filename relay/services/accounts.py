"""Accounts and their device lists."""

from __future__ import annotations

from protocol import codec
from protocol.device_list import verify_genesis
from protocol.errors import ErrorCode, TetherlessError
from protocol.ids import Address
from protocol.messages import AccountCreated, CreateAccountRequest, DeviceListChain, SignedDeviceList
from relay.store import DeviceRecord, Store

from .context import ServiceContext


class AccountService:
    def __init__(self, store: Store, ctx: ServiceContext) -> None:
        self._store = store
        self._ctx = ctx

    async def create_account(self, request: CreateAccountRequest) -> AccountCreated:
        """Register a new account from its genesis device list.

        Raises ``invalid_device_list`` / ``bad_signature`` for a list that does
        not verify and ``account_exists`` when the account is known. Not
        idempotent: a retry after success answers ``account_exists`` (the
        client then knows its account is there).
        """
        device = verify_genesis(request.signed)
        account_id = request.signed.device_list.account_id
        now = self._ctx.clock_ms()
        record = DeviceRecord(
            device_id=device.device_id,
            account_id=account_id,
            sign_key=device.sign_key,
            box_key=device.box_key,
            created_at_ms=now,
        )
        await self._store.create_account(account_id, record, codec.encode(request.signed), now)
        address = Address(account=account_id, relay=self._ctx.relay_name, device=device.device_id)
        return AccountCreated(account_id=account_id, device_id=device.device_id, address=str(address))

    async def device_list_chain(self, account_id: str) -> DeviceListChain:
        """Every version of the account's device list, genesis first. Raises ``unknown_account``."""
        blobs = await self._store.get_device_lists(account_id)
        if blobs is None:
            raise TetherlessError(ErrorCode.UNKNOWN_ACCOUNT, "no such account on this relay")
        versions = [codec.decode(blob, SignedDeviceList) for blob in blobs]
        return DeviceListChain(account_id=account_id, versions=versions)
