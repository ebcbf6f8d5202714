"""The project's pre-shared key: 32 random bytes, written in base64.

Rules:
- The accepted form is exactly what ``openssl rand -base64 32`` and ``wg genpsk`` print: 44
  characters of standard base64 (``A-Z a-z 0-9 + /``, one ``=`` of padding), optionally with
  surrounding whitespace such as the trailing newline of a file or a Secret.
- Anything else is refused with a ``UsageError`` that says what was wrong (length, alphabet,
  encoding) and never repeats the key material, not even a fragment of it: error messages end up
  in logs and in ``kubectl describe`` output.
- A key of 32 zero bytes is refused: it is what an empty or zero-filled Secret decodes to, and a
  project must not run on a key that everyone can guess.
"""

from __future__ import annotations

import base64
import binascii

from tencrypt.errors import UsageError

PSK_LEN = 32
_B64_LEN = 44  # 4 * ceil(32 / 3)
_HOWTO = "generate one with `openssl rand -base64 32` or `wg genpsk`"


def parse_psk(text: str | bytes) -> bytes:
    """Decode the project key; raise ``UsageError`` (without echoing it) if it is not 32 bytes."""
    if isinstance(text, str):
        try:
            raw = text.encode("ascii")
        except UnicodeEncodeError:
            raise UsageError(f"project key contains non-ASCII characters; {_HOWTO}") from None
    else:
        raw = bytes(text)
    raw = raw.strip()
    if not raw:
        raise UsageError(f"project key is empty; {_HOWTO}")
    if len(raw) != _B64_LEN:
        raise UsageError(f"project key must be 44 base64 characters (32 bytes), got {len(raw)} "
                         f"characters; {_HOWTO}")
    try:
        key = base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError):
        raise UsageError(f"project key is not valid base64; {_HOWTO}") from None
    # 44 characters can still decode to 31 or 33 bytes ("==" padding or none), and non-zero
    # padding bits would let two spellings mean one key: insist on the canonical encoding.
    if len(key) != PSK_LEN or base64.b64encode(key) != raw:
        raise UsageError(f"project key must decode to exactly 32 bytes; {_HOWTO}")
    if key == bytes(PSK_LEN):
        raise UsageError(f"project key is all zeros; {_HOWTO}")
    return key
