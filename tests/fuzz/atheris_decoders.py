"""Coverage-guided fuzzing of the protocol decoders with atheris (libFuzzer), for ``make fuzz``.

    python -m tests.fuzz.atheris_decoders -max_total_time=300

The first input byte picks a message type and a media type; the rest is the
body. Any exception other than TetherlessError with a documented decode code
is a crash, which libFuzzer reports with the input that caused it.
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    from protocol import codec, padding
    from protocol.errors import ErrorCode, TetherlessError
    from protocol.ids import Address
    from protocol.messages import ALL_MESSAGES

DOCUMENTED = {ErrorCode.MALFORMED_BODY, ErrorCode.INVALID_FIELD}


def one_input(data: bytes) -> None:
    if not data:
        return
    selector, body = data[0], data[1:]
    try:
        if selector == 255:
            padding.unpad(body)
        elif selector == 254:
            Address.parse(body.decode("utf-8", "replace"))
        else:
            message = ALL_MESSAGES[selector % len(ALL_MESSAGES)]
            media_type = codec.JSON if selector & 0x80 else codec.MSGPACK
            codec.decode(body, message, media_type)
    except TetherlessError as exc:
        if exc.code not in DOCUMENTED:
            raise


def main() -> None:
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
