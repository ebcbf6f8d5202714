"""The project key: exactly what `openssl rand -base64 32` / `wg genpsk` print, nothing else."""

import base64
import secrets

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tencrypt.core.psk import (
    KeySet,
    check_keyset,
    fingerprint,
    parse_key_file,
    parse_psk,
    render_key_file,
)
from tencrypt.errors import UsageError

KEY = bytes(range(1, 33))
TEXT = base64.b64encode(KEY).decode()  # 44 characters, one "=" of padding


@pytest.mark.parametrize(
    "text", [TEXT, TEXT + "\n", f"  {TEXT}\r\n", TEXT.encode(), TEXT.encode() + b"\n"]
)
def test_accepts_openssl_and_wg_output(text):
    assert parse_psk(text) == KEY


@given(st.binary(min_size=32, max_size=32).filter(any))
def test_any_nonzero_key_round_trips(key):
    assert parse_psk(base64.b64encode(key).decode() + "\n") == key


def _refused(text) -> str:
    with pytest.raises(UsageError) as info:
        parse_psk(text)
    return str(info.value)


def _padding_bits_set(text: str) -> str:
    # 32 bytes leave 2 unused bits in the last character before "=": set one of them.
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    last = alphabet.index(text[42])
    return text[:42] + alphabet[last | 1] + "="


BAD = {
    "empty": "",
    "blank": " \n",
    "31 bytes": base64.b64encode(bytes(range(1, 32))).decode(),
    "33 bytes": base64.b64encode(bytes(range(1, 34))).decode(),
    "hex": KEY.hex(),
    "not base64": "!" * 44,
    "url-safe alphabet": base64.urlsafe_b64encode(b"\xfb\xff" * 16).decode(),
    "no padding, 33 bytes": base64.b64encode(bytes(range(1, 34))).decode()[:44],
    "inner space": TEXT[:20] + " " + TEXT[21:],
    "non-ascii": TEXT[:43] + "é",
    "non-canonical padding bits": _padding_bits_set(TEXT),
    "all zeros": base64.b64encode(bytes(32)).decode(),
    "non-utf8 bytes": b"\xff" * 44,
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_refuses_anything_else_with_a_usage_error(name):
    message = _refused(BAD[name])
    assert "openssl rand -base64 32" in message


def test_padding_trick_is_really_a_different_spelling_of_the_same_bytes():
    # The non-canonical case above is refused although a lenient decoder maps it onto KEY.
    assert base64.b64decode(_padding_bits_set(TEXT)) == KEY


@given(st.integers(min_value=0, max_value=43), st.sampled_from([31, 33, 64]))
def test_error_messages_never_contain_key_material(cut, length):
    key_text = base64.b64encode(secrets.token_bytes(length)).decode()
    for text in (key_text, key_text[:cut] + "*" + key_text[cut + 1 :]):
        message = _refused(text)
        pieces = {text[i : i + 5] for i in range(len(text) - 4)}
        assert not any(piece in message for piece in pieces), message


# ---- the key ring file (tencrypt run --psk-file) -----------------------------------------------

K2 = bytes(range(2, 34))
K3 = bytes(range(3, 35))


def b64(key: bytes) -> str:
    return base64.b64encode(key).decode()


def test_a_single_key_file_is_a_ring_of_its_current_key():
    assert parse_key_file(TEXT + "\n") == KeySet(KEY)
    assert parse_key_file(f"# comment\n\n  {TEXT}\n".encode()) == KeySet(KEY)


def test_ring_lines_in_any_order_with_comments():
    text = f"# rotation\nprevious {b64(K3)}\n\ncurrent  {b64(KEY)}\nnext\t{b64(K2)}\n"
    assert parse_key_file(text) == KeySet(KEY, next=K2, previous=K3)


@given(
    st.lists(st.binary(min_size=32, max_size=32).filter(any), min_size=1, max_size=3, unique=True)
)
def test_render_and_parse_round_trip(keys):
    ring = KeySet(keys[0], *(keys[1:] + [None, None])[:2])
    text = render_key_file(ring)
    assert parse_key_file(text) == ring
    for role, fp in ring.fingerprints().items():
        assert f"# {role} {fp}" in text


RING_BAD = {
    "no current": f"next {b64(K2)}\n",
    "unknown role": f"current {b64(KEY)}\nspare {b64(K2)}\n",
    "two currents": f"current {b64(KEY)}\ncurrent {b64(K2)}\n",
    "same key twice": f"current {b64(KEY)}\nprevious {b64(KEY)}\n",
    "bad key": f"current {b64(KEY)}\nnext {b64(K2)[:40]}\n",
    "zero key": f"current {b64(KEY)}\nnext {b64(bytes(32))}\n",
    "three words": f"current {b64(KEY)} {b64(K2)}\n",
    "key first": f"{b64(K2)} next\ncurrent {b64(KEY)}\n",
    "two bare keys": f"{b64(KEY)}\n{b64(K2)}\n",
    "empty": "\n# nothing\n",
    "non-ascii": f"current {b64(KEY)}\nnext é\n".encode(),
}


@pytest.mark.parametrize("name", sorted(RING_BAD))
def test_a_malformed_ring_is_refused_without_echoing_any_key(name):
    with pytest.raises(UsageError) as info:
        parse_key_file(RING_BAD[name])
    message = str(info.value)
    for key in (KEY, K2, bytes(32)):
        text = b64(key)
        assert not any(text[i : i + 5] in message for i in range(40)), message


def test_fingerprints_name_keys_without_revealing_them():
    assert fingerprint(KEY) == fingerprint(KEY) != fingerprint(K2)
    assert len(fingerprint(KEY)) == 8 and int(fingerprint(KEY), 16) >= 0
    assert fingerprint(KEY) not in (KEY.hex(), TEXT)
    assert TEXT not in repr(KeySet(KEY, next=K2)) and KEY.hex() not in repr(KeySet(KEY))
    assert fingerprint(KEY) in repr(KeySet(KEY))


def test_check_keyset_refuses_duplicates_and_bad_lengths():
    assert check_keyset(KeySet(KEY, K2, K3)) == KeySet(KEY, K2, K3)
    for bad in (KeySet(KEY, next=KEY), KeySet(KEY[:31]), KeySet(KEY, previous=bytes(32))):
        with pytest.raises(UsageError):
            check_keyset(bad)
