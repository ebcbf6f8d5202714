"""argparse types for every command's numbers and addresses: a value out of range is refused
by the parser (usage line, exit 2) before a command touches anything, never found later by
a crash after the firewall is installed (issue 25).

Each type raises ``argparse.ArgumentTypeError`` with the value and the range it missed;
``parse_address`` is also used where an address arrives by another way than argv.
"""

from __future__ import annotations

import argparse
import ipaddress

from tencrypt.errors import UsageError

MAX_PORT = 65535


def _number(text: str, kind: type[int] | type[float]) -> int | float:
    try:
        value = kind(text)
    except ValueError:
        noun = "an integer" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"{text!r} is not {noun}") from None
    if value != value or value in (float("inf"), float("-inf")):  # nan, inf
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def port_number(text: str) -> int:
    """A TCP/UDP port, 1 to 65535 (0 would be any port: nobody could reach it)."""
    value = int(_number(text, int))
    if not 1 <= value <= MAX_PORT:
        raise argparse.ArgumentTypeError(f"{text}: not a port number (1 to {MAX_PORT})")
    return value


def positive_int(text: str) -> int:
    value = int(_number(text, int))
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text}: must be 1 or more")
    return value


def count(text: str) -> int:
    """A number of things, 0 or more."""
    value = int(_number(text, int))
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text}: must be 0 or more")
    return value


def seconds(text: str) -> float:
    """A duration that must pass: more than 0 seconds."""
    value = float(_number(text, float))
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text}: must be more than 0 seconds")
    return value


def seconds_or_zero(text: str) -> float:
    """A duration that may be none at all: 0 seconds or more."""
    value = float(_number(text, float))
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text}: must be 0 seconds or more")
    return value


def microseconds(text: str) -> float:
    """A duration in µs, 0 to one second."""
    value = float(_number(text, float))
    if not 0 <= value <= 1e6:
        raise argparse.ArgumentTypeError(f"{text}: not between 0 and 1000000 µs")
    return value


def parse_address(text: str, flag: str = "--metrics") -> tuple[str, int]:
    """``ADDR:PORT`` with ADDR an IPv4 literal or a bracketed IPv6 one (``[::1]:9137``) and
    PORT up to 65535, as (host, port); else UsageError naming ``flag``. Port 0 (the kernel
    picks one) passes here, for callers that read the port back; not from the command line
    (``address``)."""
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        ipaddress.ip_address(host)
        ok = bool(sep) and port.isdigit() and int(port) <= MAX_PORT
    except ValueError:
        ok = False
    if not ok:
        raise UsageError(
            f"{flag} wants ADDR:PORT (an IP address, a port 1 to {MAX_PORT}), e.g. "
            f"127.0.0.1:9137 or [::1]:9137, not {text!r}"
        )
    return host, int(port)


def address(text: str) -> str:
    """``ADDR:PORT`` checked by ``parse_address``, with a port 1 to 65535 (a scraper must
    know it), kept as given."""
    try:
        _, port = parse_address(text, "the address")
    except UsageError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if port == 0:
        raise argparse.ArgumentTypeError(f"{text}: port 0 is no port a scraper could find")
    return text
