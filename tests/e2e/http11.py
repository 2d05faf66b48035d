"""A deliberately plain HTTP/1.1 client (stdlib http.client) for probing a relay with exact bytes."""

from __future__ import annotations

import http.client
import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import msgspec
import nacl.public
import nacl.signing

from protocol import auth, codec, device_list
from protocol.ids import Address
from protocol.messages import AccountCreated, Challenge, Session


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def code(self) -> str:
        assert self.headers.get("content-type") == "application/problem+json", (self.status, self.body[:300])
        return str(self.json()["code"])


class Http11:
    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80

    def request(
        self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
    ) -> Answer:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=30)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            data = resp.read()
            return Answer(resp.status, {k.lower(): v for k, v in resp.getheaders()}, data)
        finally:
            conn.close()

    def msgpack(self, method: str, path: str, message: Any, token: str | None = None) -> Answer:
        headers = {"content-type": codec.MSGPACK, "accept": codec.MSGPACK}
        if token:
            headers["authorization"] = f"Bearer {token}"
        return self.request(method, path, codec.encode(message), headers)

    def get(self, path: str, token: str | None = None, accept: str = codec.JSON) -> Answer:
        headers = {"accept": accept}
        if token:
            headers["authorization"] = f"Bearer {token}"
        return self.request("GET", path, None, headers)


@dataclass
class Peer:
    signing_key: nacl.signing.SigningKey
    box_key: nacl.public.PrivateKey
    created: AccountCreated
    token: str = ""

    @property
    def device_id(self) -> str:
        return self.created.device_id

    @property
    def address(self) -> str:
        return self.created.address

    @property
    def parsed(self) -> Address:
        return Address.parse(self.created.address)


def register(http: Http11, name: str = "test") -> Peer:
    signing_key = nacl.signing.SigningKey.generate()
    box_key = nacl.public.PrivateKey.generate()
    signed = device_list.genesis(signing_key, bytes(box_key.public_key), name=name, now_ms=1_700_000_000_000)
    answer = http.msgpack("POST", "/v1/accounts", {"signed": signed})
    assert answer.status == 201, answer.body
    created = codec.decode(answer.body, AccountCreated)
    return Peer(signing_key, box_key, created)


def login(http: Http11, dev: Peer) -> str:
    challenge = codec.decode(http.msgpack("POST", "/v1/auth/challenge", {"device_id": dev.device_id}).body, Challenge)
    signature = auth.sign_challenge(dev.signing_key, challenge)
    answer = http.msgpack(
        "POST", "/v1/auth/session", {"device_id": dev.device_id, "nonce": challenge.nonce, "signature": signature}
    )
    assert answer.status == 200, answer.body
    dev.token = codec.decode(answer.body, Session).token
    return dev.token


def to_builtins(message: Any) -> Any:
    return msgspec.to_builtins(message)
