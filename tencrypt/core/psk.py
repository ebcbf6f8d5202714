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
- A pod may hold a ring of up to three keys (``KeySet``: current, next, previous) for a
  rotation without a restart; its file form is ``parse_key_file``'s. A key is named by its
  ``fingerprint`` in logs, metrics and status, never by its bytes.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from dataclasses import dataclass

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
        raise UsageError(
            f"project key must be 44 base64 characters (32 bytes), got {len(raw)} "
            f"characters; {_HOWTO}"
        )
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


# --- the key ring file: the project keys a pod holds, by role --------------------------------

ROLES = ("current", "next", "previous")  # the order a ring is written, and tried in
FINGERPRINT_LABEL = b"tencrypt key fingerprint v1"


def fingerprint(key: bytes) -> str:
    """A key's name in logs, metrics and status: the first 8 hex digits of
    ``BLAKE2s(FINGERPRINT_LABEL || key)``. It tells keys apart and reveals nothing usable
    about them (32 bits of a one-way hash of a 256-bit random key)."""
    return hashlib.blake2s(FINGERPRINT_LABEL + key).hexdigest()[:8]


def ring_label(fingerprints: dict[str, str]) -> str:
    """``current=ab12cd34,next=9f00e1c2``: a ring by its fingerprints in ``ROLES`` order, one
    string a proxy, an agent and ``tencrypt key rotate`` compare."""
    return ",".join(f"{role}={fingerprints[role]}" for role in ROLES if role in fingerprints)


@dataclass(frozen=True, slots=True)
class KeySet:
    """The project keys a pod holds: ``current`` initiates and is accepted; ``next`` (about
    to become current) and ``previous`` (just replaced) are accepted, never used to initiate.
    The three are distinct. ``repr`` shows fingerprints, never key bytes."""

    current: bytes
    next: bytes | None = None
    previous: bytes | None = None

    def roles(self) -> list[tuple[str, bytes]]:
        """``(role, key)`` for each key held, in ``ROLES`` order."""
        held = (("current", self.current), ("next", self.next), ("previous", self.previous))
        return [(role, key) for role, key in held if key is not None]

    def fingerprints(self) -> dict[str, str]:
        """``{role: fingerprint}`` for each key held."""
        return {role: fingerprint(key) for role, key in self.roles()}

    def __repr__(self) -> str:
        return f"KeySet({self.fingerprints()})"


def check_keyset(keys: KeySet) -> KeySet:
    """``keys`` if its keys are 32 non-zero bytes and distinct; else ``UsageError``."""
    held = keys.roles()
    for role, key in held:
        if len(key) != PSK_LEN or key == bytes(PSK_LEN):
            raise UsageError(f"the {role} project key must be 32 non-zero bytes")
    for i, (role, key) in enumerate(held):
        for other, key2 in held[i + 1 :]:
            if key == key2:
                raise UsageError(
                    f"the {role} and {other} project keys are the same key: a "
                    "rotation needs a new key (`openssl rand -base64 32`)"
                )
    return keys


def parse_key_file(text: str | bytes) -> KeySet:
    """The key file of ``tencrypt run --psk-file``, in either of two forms:

    - one key (44 base64 characters, ``parse_psk``): the ring is that key alone, as current;
    - a ring: one ``ROLE KEY`` line per key, ROLE one of ``current``, ``next``, ``previous``
      (each at most once, ``current`` required, keys distinct); blank lines and lines
      starting with ``#`` are ignored.

    Anything else is a ``UsageError`` naming the line and what was wrong, never its text
    (it may hold key material).
    """
    if isinstance(text, bytes):
        try:
            text = text.decode("ascii")
        except UnicodeDecodeError:
            raise UsageError(f"key file contains non-ASCII bytes; {_HOWTO}") from None
    lines = [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1)]
    lines = [(n, line) for n, line in lines if line and not line.startswith("#")]
    if len(lines) == 1 and len(lines[0][1].split()) == 1:
        return KeySet(parse_psk(lines[0][1]))
    found: dict[str, bytes] = {}
    for n, line in lines:
        words = line.split()
        if len(words) != 2 or words[0] not in ROLES:
            raise UsageError(
                f"key file line {n}: expected `current|next|previous KEY` "
                "(or the whole file one key)"
            )
        if words[0] in found:
            raise UsageError(f"key file line {n}: a second {words[0]} key")
        try:
            found[words[0]] = parse_psk(words[1])
        except UsageError as exc:
            raise UsageError(f"key file line {n} ({words[0]}): {exc}") from None
    if "current" not in found:
        raise UsageError("key file has no `current KEY` line: the key used to initiate")
    return check_keyset(KeySet(found["current"], found.get("next"), found.get("previous")))


def render_key_file(keys: KeySet) -> str:
    """The ring form of ``parse_key_file``, with fingerprints as comments (what the agent
    and the lab write)."""
    lines = ["# tencrypt project keys: ROLE KEY (fingerprints in comments)"]
    for role, key in check_keyset(keys).roles():
        lines += [f"# {role} {fingerprint(key)}", f"{role} {base64.b64encode(key).decode('ascii')}"]
    return "\n".join(lines) + "\n"
