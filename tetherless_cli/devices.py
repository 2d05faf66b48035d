"""``tetherless device …`` and the device side of ``whoami`` (crypto.md §3-§5, §13).

::

    device init --relay URL [--name NAME] [--ca-file PEM] [--recovery-key-file FILE] [--no-recovery-key]
    device link --relay URL [--name NAME] [--ca-file PEM] [--timeout S]
        prints the link code on the first line of stdout, waits for an approval, joins, prints the address
    device link --relay URL --account ADDRESS --recovery-key [--recovery-key-file FILE] [--revoke ID]…
        joins with the account's recovery key (read from FILE, else stdin / a prompt), then opens the
        account's recovery backups with it (the whole history's keys, account-log.md §5.7)
    device approve CODE [--yes] [--timeout S]
        add the device showing CODE, wait until it joins, then grant it the account's history
    device list [--json]            the verified device list
    device revoke ID|ADDRESS        remove a device (this one too)
    device link --relay URL --account ADDRESS --fido2 [--revoke ID]…
        joins approved by a FIDO2 security key of the account (crypto.md §5.3)
    device approve|revoke … --fido2 a security key of the account approves the change too
    device fido2 add [--name NAME] | list [--json] | remove ID [--yes] [--fido2]   the account's security keys
    device policy [--require-fido2|--no-require-fido2] [--user-verification|--no-user-verification]
        [--threshold N] [--fido2] [--yes] [--json]   show (no setting) or set who must approve list changes
    device recovery-key [--recovery-key-file FILE]   create a new recovery key and show it once
    device upgrade                  upgrade the account's device list to format 3 / publish this device's ML-KEM key
    device protect                  encrypt a home made by the first client version

Exit codes: :mod:`tetherless_cli.exits`.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import getpass
import json
import os
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

from protocol import device_list, recovery
from protocol.client import devices
from protocol.client.home import make_engine, open_store
from protocol.client.http import Origin, TransportError
from protocol.client.keystore import KEM_SEED_BYTES, DeviceKeys, Keystore, keyring_available
from protocol.client.sdk import RelayClient
from protocol.client.sync import SyncOutcome, remember_recovery_backup_key
from protocol.errors import ErrorCode, TetherlessError
from protocol.ids import Address
from protocol.messages import DeviceEntry, DeviceList, DeviceListAccepted, EnrolmentOffer, Policy
from tetherless_cli.exits import EXIT_FAILURE, EXIT_OK, UsageError
from tetherless_cli.fido2 import assertion_provider, security_key
from tetherless_cli.home import ask, load, new_home, open_keystore, require_yes_off_terminal, with_ca_file
from tetherless_cli.messages import report_refusals

RECOVERY_KEY_ENV = "TETHERLESS_RECOVERY_KEY"
BACKUP_TIMEOUT_SECONDS = 60.0  # the one sync that writes (init, recovery-key) or reads (link) the recovery backup


# -- output helpers ------------------------------------------------------------------------------


def show_recovery_key(text: str, path: str | None, *, stdout: bool = False) -> None:
    """Show a new recovery key once: on stderr (stdout with ``stdout``) or into ``path`` (0600, new file)."""
    if path:
        target = Path(path).expanduser()
        try:
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            raise UsageError(f"{target} exists; refusing to overwrite a recovery key") from None
        with os.fdopen(fd, "w", encoding="ascii") as file:
            file.write(text + "\n")
            file.flush()
            os.fsync(file.fileno())
        print(f"recovery key written to {target}: print it, keep it offline, then delete the file", file=sys.stderr)
        return
    out = sys.stdout if stdout else sys.stderr
    print(text, file=out, flush=True)
    print(
        "write this recovery key down and keep it away from your devices: it is shown only once, and it can add "
        "a device and revoke the others when you have none left",
        file=sys.stderr,
        flush=True,
    )


async def sync_with_recovery_key(
    keystore: Keystore, keys: DeviceKeys, recovery_text: str, *, timeout_seconds: float
) -> tuple[list[int], int]:
    """One sync of this device while it holds the recovery secret (account-log.md §5.7): it opens every
    recovery backup in the log (a device enrolled by the recovery key alone gets the history's keys) and backs
    the newest epoch up to the recovery key the list commits to (``device init``, ``device recovery-key``).

    Returns (epochs whose keys came from a backup, newest epoch backed up to this recovery key; 0: none).
    Raises ``unavailable`` / ``log_rekey_required`` when the sync does not finish within ``timeout_seconds``.
    The derived keys live only in this call; cancellation leaves the store consistent (the engine commits
    each step) and the secret nowhere.
    """
    rk = recovery.recovery_keys(recovery.parse_recovery_secret(recovery_text), keys.account_id)
    engine = make_engine(keys, open_store(keystore, keys))
    engine.recovery = rk
    try:
        outcome = await engine.run(follow=False, timeout=timeout_seconds)
        report_refusals(engine)
        if outcome is not SyncOutcome.DONE:
            raise TetherlessError(
                ErrorCode.LOG_REKEY_REQUIRED if engine.last_failure.startswith("log_") else ErrorCode.UNAVAILABLE,
                f"the sync that reads and writes the recovery backup did not finish: "
                f"{engine.last_failure or 'relay unreachable'}",
            )
        return sorted(engine.recovered_epochs), engine.backed_up_epoch(devices.backup_hash(rk))
    finally:
        engine.recovery = None
        engine.store.db.close()


def remember_new_recovery_key(keystore: Keystore, keys: DeviceKeys, recovery_text: str) -> None:
    """``device init``: keep the *public* backup key of the recovery key just made (account-log.md §5.7), so this
    device's first sync backs epoch 1 up to it once it creates the epoch. The secret is not kept."""
    rk = recovery.recovery_keys(recovery.parse_recovery_secret(recovery_text), keys.account_id)
    store = open_store(keystore, keys)
    try:
        with store.transaction():
            remember_recovery_backup_key(store, recovery.backup_recipient(rk))
    finally:
        store.db.close()


def report_backup(backed_up: int) -> None:
    """The line ``device init`` / ``device recovery-key`` print on stderr about the recovery backup."""
    if backed_up:
        print(
            f"recovery backup: the account keys up to epoch {backed_up} are backed up to this recovery key",
            file=sys.stderr,
        )
    else:
        print(
            "tetherless: warning: recovery backup: none written; a device enrolled by this recovery key alone "
            "would read no history (run `tetherless device recovery-key` to make a new key with a backup)",
            file=sys.stderr,
        )


def _iso(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, tz=dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _policy_text(dl: DeviceList) -> str:
    if dl.format == device_list.FORMAT_1:
        return "any one device (format 1)"
    return _policy_words(dl.policy)


def _policy_words(policy: Policy) -> str:
    text = "any one device" if policy.threshold == 1 else f"{policy.threshold} approvals"
    if policy.require_webauthn:
        text += ", a hardware key must co-sign"
    if policy.require_user_verification:
        text += ", with user verification"
    return text


@asynccontextmanager
async def _device_client(keystore: Keystore, keys: DeviceKeys) -> AsyncIterator[RelayClient]:
    db = keystore.local_db() if keystore.is_protected() else None
    async with RelayClient.connect(keys.relay_url, keys=keys, local_db=db) as client:
        yield client


async def _with_device(
    args: argparse.Namespace,
    body: Callable[[DeviceKeys, RelayClient], Awaitable[int]],
    *,
    signs_list: bool = False,
    after: Callable[[Keystore, DeviceKeys, int], Awaitable[int]] | None = None,
) -> int:
    """Unlock this home's device, connect it to its relay and run ``body``; returns its exit code.

    ``signs_list``: ``body`` may sign a device-list version, so a home made
    before format 3 gets its long-term ML-KEM key first (crypto.md §3.6).
    ``after(keystore, keys, body's exit code)``: runs once ``body``'s connection
    is closed (a sync engine opens its own, on the same local database).
    """
    keystore, keys = load(args)
    if signs_list:
        keys = with_ca_file(args, keystore.ensure_kem_key(os.urandom(KEM_SEED_BYTES)))
    args.relay_url = keys.relay_url
    async with _device_client(keystore, keys) as client:
        code = await body(keys, client)
    return code if after is None else await after(keystore, keys, code)


def _invalid_field(exc: TetherlessError) -> bool:
    return exc.code is ErrorCode.INVALID_FIELD


Change = Callable[[devices.AssertionProvider | None], Awaitable[DeviceListAccepted | None]]


async def _approved_change(
    args: argparse.Namespace,
    keys: DeviceKeys,
    change: Change,
    asked: tuple[str, str] | None,
    done: str,
    usage: Callable[[TetherlessError], bool] = _invalid_field,
) -> int:
    """A device-list change this device approves, the one shape of ``revoke``, ``fido2 remove`` and ``policy``;
    returns the exit code.

    With ``--fido2`` the security key is looked for first (none plugged in: its one line, nothing sent);
    ``asked`` = (question, what a no prints) is asked unless ``--yes`` (a no: exit 1); then
    ``change(get_assertion)`` runs and ``done; device list version N`` is printed. An error of the change
    that ``usage`` picks is a usage error (exit 2).
    """
    get_assertion = assertion_provider(keys.relay_url, args.fido2)
    if asked is not None and not ask(asked[0], yes=args.yes):
        print(asked[1], file=sys.stderr)
        return EXIT_FAILURE
    try:
        accepted = await change(get_assertion)
    except TetherlessError as exc:
        if usage(exc):
            raise UsageError(str(exc.detail)) from exc
        raise
    print(f"{done}; device list version {accepted.version}" if accepted else f"{done}; the device list was so already")
    return EXIT_OK


def _read_recovery_key(args: argparse.Namespace) -> str:
    if args.recovery_key_file:
        try:
            lines = Path(args.recovery_key_file).expanduser().read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"cannot read --recovery-key-file: {exc}") from exc
        return lines[0] if lines else ""
    env = os.environ.get(RECOVERY_KEY_ENV)
    if env:
        return env
    if sys.stdin.isatty():
        return getpass.getpass("Recovery key (tlr-…): ")
    line = sys.stdin.readline()
    if not line.strip():
        raise UsageError("a recovery key is needed: --recovery-key-file FILE, $TETHERLESS_RECOVERY_KEY or stdin")
    return line.strip()


# -- commands --------------------------------------------------------------------------------------


async def cmd_device_link(args: argparse.Namespace) -> int:
    """``device link``: join an account approved by a link code (or by its recovery key, or a security key)."""
    relay_url = args.relay_url = str(args.relay).rstrip("/")
    name = args.name if args.name is not None else socket.gethostname()
    timeout = args.timeout if args.timeout is not None else devices.LINK_TIMEOUT_SECONDS
    try:
        Origin.parse(relay_url)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    if args.recovery_key and args.fido2:
        raise UsageError("--recovery-key and --fido2 are two ways to approve: choose one")
    if args.account and not (args.recovery_key or args.fido2):
        raise UsageError("--account needs --recovery-key or --fido2")
    if (args.recovery_key or args.fido2) and not args.account:
        raise UsageError(f"{'--fido2' if args.fido2 else '--recovery-key'} needs --account ADDRESS (account@relay)")
    if args.revoke and not (args.recovery_key or args.fido2):
        raise UsageError("--revoke goes with --recovery-key or --fido2 (a current device uses `device revoke`)")
    if args.account:
        try:
            Address.parse(args.account)
        except TetherlessError as exc:
            raise UsageError(f"not an account address: {args.account!r} (expected account@relay)") from exc
    key = security_key(relay_url) if args.fido2 else None  # no key plugged in: fail before making a home
    keystore = new_home(args)
    text = ""
    async with RelayClient.connect(relay_url, ca_file=args.ca_file) as client:
        if key is not None:
            keys = await devices.join_with_authenticator(
                client, args.account, key.get_assertion, keystore=keystore, name=name, revoke=args.revoke
            )
        elif args.recovery_key:
            text = _read_recovery_key(args)
            try:
                keys = await devices.join_with_recovery(
                    client, args.account, text, keystore=keystore, name=name, revoke=args.revoke
                )
            except ValueError as exc:
                raise UsageError(f"not a recovery key: {exc}") from exc
        else:
            pending = await devices.start_link(client)
            print(pending.code, flush=True)  # the first line of stdout, for scripts
            print(f"fingerprint: {pending.fingerprint}", flush=True)
            print(
                f"on one of your devices run: tetherless device approve {pending.code}  (waiting until "
                f"{_iso(pending.expires_at_ms)})",
                file=sys.stderr,
                flush=True,
            )
            keys = await devices.finish_link(client, pending, keystore=keystore, name=name, timeout_seconds=timeout)
    await publish_prekeys(keystore, keys)
    print(keys.address, flush=True)
    if text:
        await _recover_history(keystore, keys, text, timeout)
    elif key is not None:
        print(
            "joined with the security key: the account's history reaches this device with the next `tetherless "
            "sync` of another of its devices",
            file=sys.stderr,
        )
    return EXIT_OK


async def _recover_history(keystore: Keystore, keys: DeviceKeys, text: str, timeout_seconds: float) -> None:
    """After a join by the recovery key: open the recovery backups while the secret is still here (§5.7)."""
    try:
        recovered, _ = await sync_with_recovery_key(keystore, keys, text, timeout_seconds=timeout_seconds)
    except TetherlessError as exc:
        raise TetherlessError(
            exc.code,
            f"joined as {keys.address}, but {exc.detail}; the history's keys can only be read while the recovery "
            "key is at hand: move this home aside and run `tetherless device link --recovery-key` again",
        ) from exc
    if recovered:
        print(
            f"recovered the account keys of {len(recovered)} epoch(s) from the recovery backup "
            f"(epochs {recovered[0]}-{recovered[-1]})",
            file=sys.stderr,
        )
    else:
        print(
            "tetherless: warning: no recovery backup opened: this device reads only history written after it "
            "joined (the account's devices back up to the recovery key since it was made or replaced by a "
            "client with recovery backups)",
            file=sys.stderr,
        )


async def cmd_device_approve(args: argparse.Namespace) -> int:
    """``device approve CODE [--yes] [--fido2] [--timeout S]``: check the code's offer, propose the version adding that
    device, wait until it joins, then grant it the account's history (account-log.md §5.5) before succeeding.

    Resumable: a retried approve whose code was already answered (``enrolment_used``) still completes the
    history grants of every device of the account before it reports that error; so does any ``sync``.
    """
    require_yes_off_terminal(args, "device approve")
    joined: list[devices.ApprovedLink] = []
    answered: list[TetherlessError] = []

    def confirm(offer: EnrolmentOffer, fingerprint: str) -> bool:
        return ask(f"Add the device with fingerprint {fingerprint} to this account?", yes=args.yes)

    async def body(keys: DeviceKeys, client: RelayClient) -> int:
        get_assertion = assertion_provider(keys.relay_url, args.fido2)
        try:
            approved = await devices.approve_link(client, args.code, confirm=confirm, get_assertion=get_assertion)
        except ValueError as exc:
            raise UsageError(f"not a link code: {exc}") from exc
        except PermissionError:
            print("not approved", file=sys.stderr)
            return EXIT_FAILURE
        except TetherlessError as exc:
            if exc.code is not ErrorCode.ENROLMENT_USED:
                raise
            answered.append(exc)  # perhaps our own earlier, interrupted approval: finish its grants first
            return EXIT_OK
        print(
            f"approved {approved.fingerprint}: {approved.address} joins (version {approved.version}) when it confirms",
            flush=True,
        )
        if not await devices.wait_for_join(client, approved, timeout_seconds=args.timeout):
            raise TetherlessError(
                ErrorCode.ENROLMENT_EXPIRED,
                f"{approved.address} has not joined within {args.timeout:g} s; the approval stands until its link "
                "code expires, and if it joins, this account's next `tetherless sync` grants it the history",
            )
        joined.append(approved)
        return EXIT_OK

    async def grant_history(keystore: Keystore, keys: DeviceKeys, code: int) -> int:
        if code != EXIT_OK:
            return code
        engine = make_engine(keys, open_store(keystore, keys))
        try:
            synced = await engine.run(follow=False, timeout=args.timeout)
            if synced is not SyncOutcome.DONE:
                raise TetherlessError(
                    ErrorCode.LOG_REKEY_REQUIRED if engine.last_failure.startswith("log_") else ErrorCode.UNAVAILABLE,
                    f"the history grant was not written ({engine.last_failure or 'relay unreachable'}); "
                    "run `tetherless sync` to finish it",
                )
            for approved in joined:
                if not engine.history_granted(approved.device_id):
                    raise TetherlessError(
                        ErrorCode.LOG_REKEY_REQUIRED,
                        f"{approved.address} joined but holds no grant of the newest epoch yet; "
                        "run `tetherless sync` to finish it",
                    )
                print(f"granted the account's history to {approved.address}", flush=True)
        finally:
            engine.store.db.close()
        if answered:
            raise answered[0]
        return EXIT_OK

    return await _with_device(args, body, signs_list=True, after=grant_history)


async def cmd_device_list(args: argparse.Namespace) -> int:
    """``device list [--json]``: the verified chain's head, with each device's name where it is known.

    A format-1 list carries the names given at ``device init/link --name``; from format 2 on the list carries
    none (crypto.md §3.1) and each name stays in its own device's home, so only this device's is shown.
    """

    def name_of(entry: DeviceEntry, keys: DeviceKeys) -> str:
        return entry.name or (keys.device_name if entry.device_id == keys.device_id else "")

    async def body(keys: DeviceKeys, client: RelayClient) -> int:
        head = (await client.device_chain(keys.account_id)).head
        if args.json:
            record = {
                "account": keys.account_address,
                "version": head.version,
                "format": head.format,
                "policy": {
                    "threshold": head.policy.threshold,
                    "require_webauthn": head.policy.require_webauthn,
                    "require_user_verification": head.policy.require_user_verification,
                },
                "recovery_key": bool(head.recovery_key),
                "recovery_backup": bool(head.recovery_backup_key_hash),
                "devices": [
                    {
                        "device_id": d.device_id,
                        "name": name_of(d, keys) or None,
                        "address": str(
                            Address(
                                account=head.account_id, relay=Address.parse(keys.address).relay, device=d.device_id
                            )
                        ),
                        "added_at_ms": d.added_at_ms,
                        "role": d.role,
                        "scopes": list(d.scopes),
                        "kem_key": bool(d.kem_key),
                        "this_device": d.device_id == keys.device_id,
                    }
                    for d in head.devices
                ],
                "credentials": [
                    {"credential_id": c.credential_id.hex(), "rp_id": c.rp_id, "added_at_ms": c.added_at_ms}
                    for c in head.credentials
                ],
            }
            print(json.dumps(record))
            return EXIT_OK
        print(f"account {keys.account_address}  (device list version {head.version})")
        print(f"policy: {_policy_text(head)};  recovery key: {'set' if head.recovery_key else 'not set'}")
        if head.recovery_key and not head.recovery_backup_key_hash:
            print("recovery backup: none (the recovery key predates backups: `device recovery-key` makes one)")
        for d in head.devices:
            mark = "  (this device)" if d.device_id == keys.device_id else ""
            role = "" if d.role == device_list.ROLE_DEVICE else f"  role {d.role} ({', '.join(d.scopes) or '-'})"
            name = name_of(d, keys)
            named = f"  {json.dumps(name, ensure_ascii=False)}" if name else ""
            print(f"device {d.device_id}{named}  added {_iso(d.added_at_ms)}{role}{mark}")
        for c in head.credentials:
            print(f"hardware key {c.credential_id.hex()[:16]}  rp {c.rp_id}  added {_iso(c.added_at_ms)}")
        return EXIT_OK

    return await _with_device(args, body)


async def cmd_device_revoke(args: argparse.Namespace) -> int:
    """``device revoke ID [--yes] [--fido2]``: sign and post the version that removes the device, once confirmed
    (asked at a terminal; off one ``--yes`` is required, else exit 2 and nothing is revoked)."""
    require_yes_off_terminal(args, "device revoke")

    async def body(keys: DeviceKeys, client: RelayClient) -> int:
        target = args.device.split(".", 1)[0] if "@" in args.device else args.device
        itself = " (this device: it stops working now)" if target == keys.device_id else ""
        # Asked before the first request: the client connects lazily, so nothing was sent yet.
        question = (f"Revoke device {target}{itself} from {keys.account_address}?", "not revoked")
        by_address = "@" in args.device  # an address that does not parse is a usage error; an id is looked up

        def change(get_assertion: devices.AssertionProvider | None) -> Awaitable[DeviceListAccepted]:
            return devices.revoke_device(client, args.device, get_assertion=get_assertion)

        return await _approved_change(
            args, keys, change, question, f"revoked {target}{itself}", lambda exc: by_address and _invalid_field(exc)
        )

    return await _with_device(args, body, signs_list=True)


KEY_NAMES_TABLE = "fido2_key_names"  # credential id (hex) -> the name given at `device fido2 add --name`


def _key_name(client: RelayClient, credential_id: bytes) -> str:
    raw = client.local_db.get(KEY_NAMES_TABLE, credential_id.hex()) if client.local_db is not None else None
    return raw.decode("utf-8") if raw else ""


async def cmd_device_fido2_add(args: argparse.Namespace) -> int:
    """``device fido2 add [--name NAME]``: register the plugged-in security key for this relay's rp id
    (``POST /v1/webauthn/register/*``) and post the version adding it, approved by this device and proved by
    the key's assertion (crypto.md §3.2 step 4, §6). The key is touched twice: to create, then to sign."""
    if args.name is not None and len(args.name) > 64:
        raise UsageError("--name is at most 64 characters")

    async def body(keys: DeviceKeys, client: RelayClient) -> int:
        key = security_key(keys.relay_url)
        credential = await devices.add_credential(client, key.make_credential, key.get_assertion)
        if args.name and client.local_db is not None:
            client.local_db.put(KEY_NAMES_TABLE, credential.credential_id.hex(), args.name.encode("utf-8"))
        print(f"added security key {credential.credential_id.hex()[:16]} (rp {credential.rp_id}) to the account")
        return EXIT_OK

    return await _with_device(args, body, signs_list=True)


async def cmd_device_fido2_list(args: argparse.Namespace) -> int:
    """``device fido2 list [--json]``: the security keys in the verified device list (names: this device's)."""

    async def body(keys: DeviceKeys, client: RelayClient) -> int:
        head = (await client.device_chain(keys.account_id)).head
        rows = [
            {
                "id": c.credential_id.hex(),
                "name": _key_name(client, c.credential_id) or None,
                "rp_id": c.rp_id,
                "added_at_ms": c.added_at_ms,
            }
            for c in head.credentials
        ]
        if args.json:
            print(json.dumps({"account": keys.account_address, "version": head.version, "keys": rows}))
            return EXIT_OK
        if not rows:
            print("no security keys (add one with `tetherless device fido2 add`)")
        for row in rows:
            named = f"  {json.dumps(row['name'], ensure_ascii=False)}" if row["name"] else ""
            print(f"{str(row['id'])[:16]}{named}  rp {row['rp_id']}  added {_iso(int(str(row['added_at_ms'])))}")
        return EXIT_OK

    return await _with_device(args, body)


async def cmd_device_fido2_remove(args: argparse.Namespace) -> int:
    """``device fido2 remove ID [--yes] [--fido2]``: post the version without that key, once confirmed (asked
    at a terminal; off one ``--yes`` is required, else exit 2 and nothing is removed)."""
    require_yes_off_terminal(args, "device fido2 remove")

    async def body(keys: DeviceKeys, client: RelayClient) -> int:
        question = (f"Remove security key {args.key} from {keys.account_address}?", "not removed")

        def change(get_assertion: devices.AssertionProvider | None) -> Awaitable[DeviceListAccepted]:
            return devices.remove_credential(client, args.key, get_assertion=get_assertion)

        return await _approved_change(args, keys, change, question, f"removed security key {args.key}")

    return await _with_device(args, body, signs_list=True)


def _policy_json(keys: DeviceKeys, head: DeviceList) -> dict[str, object]:
    device_count, key_count = devices.approvers(head)
    return {
        "account": keys.account_address,
        "version": head.version,
        "threshold": head.policy.threshold,
        "require_webauthn": head.policy.require_webauthn,
        "require_user_verification": head.policy.require_user_verification,
        "approvers": {"devices": device_count, "hardware_keys": key_count},
    }


async def cmd_device_policy(args: argparse.Namespace) -> int:
    """``device policy [--require-fido2|--no-require-fido2] [--user-verification|--no-user-verification]
    [--threshold N] [--fido2] [--yes] [--json]``: show the account's approval policy (no setting given), or
    post the version that changes it, approved as the current policy demands (crypto.md §3.2).

    Nonsense (a key required while none is registered, a threshold above the approvers) is one line, exit 2,
    before a key is touched. Loosening asks at a terminal; off one it needs ``--yes`` (else exit 2, nothing
    changed). Setting the policy it has already changes nothing (exit 0).
    """
    changes = {
        "threshold": args.threshold,
        "require_webauthn": args.require_fido2,
        "require_user_verification": args.user_verification,
    }
    if all(value is None for value in changes.values()):
        if args.fido2 or args.yes:
            raise UsageError("--fido2 and --yes go with a change: --require-fido2, --user-verification, --threshold")
    elif args.json:
        raise UsageError("--json goes with showing the policy (no setting given)")

    async def body(keys: DeviceKeys, client: RelayClient) -> int:
        head = (await client.device_chain(keys.account_id)).head
        if all(value is None for value in changes.values()):
            if args.json:
                print(json.dumps(_policy_json(keys, head)))
                return EXIT_OK
            device_count, key_count = devices.approvers(head)
            print(f"account {keys.account_address}  (device list version {head.version})")
            print(f"policy: {_policy_text(head)}")
            print(f"approvers: {device_count} device(s), {key_count} hardware key(s)")
            return EXIT_OK
        try:
            wanted = devices.plan_policy(head, **changes)
        except TetherlessError as exc:
            raise UsageError(exc.detail) from exc
        if wanted == head.policy:
            print(f"the policy is already: {_policy_text(head)}; nothing changed")
            return EXIT_OK
        loosens = devices.policy_loosens(head.policy, wanted)
        if loosens:
            require_yes_off_terminal(args, "device policy")  # only to loosen: tightening asks nothing
        # Before any key is touched or anything is sent: can this device (and --fido2's key) approve at all?
        devices.check_own_approvals(head, keys.device_id, with_key=args.fido2)
        question = (
            f"Loosen the policy of {keys.account_address} from {_policy_text(head)!r} to {_policy_words(wanted)!r}?"
        )

        def change(get_assertion: devices.AssertionProvider | None) -> Awaitable[DeviceListAccepted | None]:
            return devices.set_policy(client, wanted, get_assertion=get_assertion)

        asked = (question, "not changed") if loosens else None
        return await _approved_change(args, keys, change, asked, f"policy: {_policy_words(wanted)}")

    return await _with_device(args, body, signs_list=True)


async def cmd_device_recovery_key(args: argparse.Namespace) -> int:
    """``device recovery-key``: a new recovery key, set in the list, shown once on stdout (or into a file)."""

    async def body(keys: DeviceKeys, client: RelayClient) -> int:
        verified = await client.device_chain(keys.account_id)
        if verified.head.format == device_list.FORMAT_1:
            raise TetherlessError(ErrorCode.INVALID_DEVICE_LIST, "recovery keys need format 2 or 3")
        made.append(await devices.set_recovery_key(client))
        show_recovery_key(made[0], args.recovery_key_file, stdout=True)
        return EXIT_OK

    async def back_up(keystore: Keystore, keys: DeviceKeys, code: int) -> int:
        # The list now commits to the new key only: back every epoch key up to it (account-log.md §5.7).
        if code == EXIT_OK and made:
            _, backed_up = await sync_with_recovery_key(keystore, keys, made[0], timeout_seconds=BACKUP_TIMEOUT_SECONDS)
            report_backup(backed_up)
        return code

    made: list[str] = []
    return await _with_device(args, body, signs_list=True, after=back_up)


async def cmd_device_upgrade(args: argparse.Namespace) -> int:
    """``device upgrade``: one version that makes the list format 3 and carries this device's ML-KEM key."""

    async def body(keys: DeviceKeys, client: RelayClient) -> int:
        accepted = await devices.upgrade_list(client)
        if accepted is None:
            print("the device list is format 3 and carries this device's ML-KEM key already")
        else:
            print(f"device list upgraded to format 3 with this device's ML-KEM key; version {accepted.version}")
        return EXIT_OK

    return await _with_device(args, body, signs_list=True)


async def cmd_device_protect(args: argparse.Namespace) -> int:
    """``device protect [--keyring]``: encrypt a format-1 home (keystore.tlk + state.db), delete the plaintext."""
    use_keyring = bool(args.keyring)
    if use_keyring and not keyring_available():
        raise UsageError("--keyring: no secure OS keyring is available here; protect the home with a passphrase")
    keystore = open_keystore(args, confirm=True)
    if use_keyring:
        keystore = Keystore(keystore.home)
    keystore.protect(use_keyring=use_keyring)
    with contextlib.suppress(Exception):
        keystore.close()
    print(f"protected {keystore.home}: the keys are encrypted in keystore.tlk; the plaintext files are deleted")
    return EXIT_OK


async def publish_prekeys(keystore: Keystore, keys: DeviceKeys) -> None:
    """Publish a new format-2 device's prekeys (``PUT /v1/prekeys``) so others can start sessions with it
    at once (crypto.md §7.2); a device that joined with a link code keeps the prekeys it offered then.

    Best effort: a failure is reported on stderr and ``sync`` publishes them later (the engine does it on
    every connection). Format-1 devices and unprotected homes have no sessions: nothing to do.
    """
    if keys.list_format < 2 or not keystore.is_protected():
        return
    try:
        async with RelayClient.connect(
            keys.relay_url, keys=keys, max_attempts=2, request_timeout_seconds=15, local_db=keystore.local_db()
        ) as client:
            await client.enable_sessions()
    except (TetherlessError, TransportError) as exc:
        print(f"tetherless: warning: prekeys not published yet ({exc}); `tetherless sync` retries", file=sys.stderr)


async def cmd_device_init(args: argparse.Namespace) -> int:
    """``device init --relay URL [--name NAME]``: register, store the keys, print the address."""
    relay_url = args.relay_url = str(args.relay).rstrip("/")
    name = args.name if args.name is not None else socket.gethostname()
    try:
        Origin.parse(relay_url)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    if len(name) > 64:
        raise UsageError("--name is at most 64 characters")
    keystore = new_home(args)  # the passphrase is asked before the account exists on the relay
    secret = None
    if args.list_format >= 2 and not args.no_recovery_key:
        secret = os.urandom(recovery.SECRET_BYTES)
    async with RelayClient.connect(relay_url, ca_file=args.ca_file) as client:
        keys = await client.register(name, keystore=keystore, list_format=args.list_format, recovery_secret=secret)
    await publish_prekeys(keystore, keys)
    print(keys.address, flush=True)
    if secret is not None:
        text = recovery.new_recovery_secret(secret)
        show_recovery_key(text, args.recovery_key_file)
        remember_new_recovery_key(keystore, keys, text)  # account-log.md §5.7
    return EXIT_OK


__all__ = [
    "cmd_device_approve",
    "cmd_device_fido2_add",
    "cmd_device_fido2_list",
    "cmd_device_fido2_remove",
    "cmd_device_init",
    "cmd_device_link",
    "cmd_device_list",
    "cmd_device_policy",
    "cmd_device_protect",
    "cmd_device_recovery_key",
    "cmd_device_revoke",
    "cmd_device_upgrade",
    "publish_prekeys",
    "show_recovery_key",
]
