"""``python -m tencrypt.nodesync`` = ``tencrypt node-sync`` (same flags, same handler)."""

import argparse
import logging
import sys

from tencrypt.errors import TencryptError
from tencrypt.nodesync.cli import add_arguments, main


def run(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="tencrypt node-sync",
        description="keep the node's VIP:1337 -> pods forwarding (nftables table inet "
        "tencrypt, or the TENCRYPT iptables chain) in step with the cluster's Services and "
        "endpoints",
    )
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return main(args)
    except TencryptError as exc:
        print(f"tencrypt node-sync: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(run())
