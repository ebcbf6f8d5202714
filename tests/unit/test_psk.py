"""The project key: exactly what `openssl rand -base64 32` / `wg genpsk` print, nothing else."""

import base64
import secrets

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tencrypt.core.psk import parse_psk
from tencrypt.errors import UsageError

KEY = bytes(range(1, 33))
TEXT = base64.b64encode(KEY).decode()  # 44 characters, one "=" of padding


@pytest.mark.parametrize("text", [TEXT, TEXT + "\n", f"  {TEXT}\r\n", TEXT.encode(),
                                  TEXT.encode() + b"\n"])
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
    for text in (key_text, key_text[:cut] + "*" + key_text[cut + 1:]):
        message = _refused(text)
        pieces = {text[i:i + 5] for i in range(len(text) - 4)}
        assert not any(piece in message for piece in pieces), message
