"""Relay key rotation on disk: the old key stays published for verification until its overlap ends."""

from __future__ import annotations

from pathlib import Path

from protocol.federation import relay_key_id
from relay.relay_keys import load_keyring, rotate


def test_rotation_keeps_the_old_key_valid_for_the_overlap(tmp_path: Path) -> None:
    first = load_keyring(tmp_path, now_ms=0)
    assert [k.key_id for k in first.published] == [first.key_id]
    assert (tmp_path / "relay.key").stat().st_mode & 0o077 == 0
    retired, new = rotate(tmp_path, overlap_ms=1000, now_ms=100)
    assert retired.key_id == first.key_id
    assert retired.valid_until_ms == 1100
    during = load_keyring(tmp_path, now_ms=500)
    assert during.key_id == new.key_id == relay_key_id(bytes(during.signing_key.verify_key))
    assert [(k.key_id, k.valid_until_ms) for k in during.published] == [(new.key_id, None), (first.key_id, 1100)]
    after = load_keyring(tmp_path, now_ms=1101)
    assert [k.key_id for k in after.published] == [new.key_id]
    # a second rotation keeps the still-valid retired key and prunes nothing early
    rotate(tmp_path, overlap_ms=1000, now_ms=600)
    assert len(load_keyring(tmp_path, now_ms=700).published) == 3
