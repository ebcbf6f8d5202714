"""The two kinds of error Tencrypt raises on purpose (as h11 does).

- ``UsageError``: the operator asked for something that cannot be done (bad flag, bad key,
  missing privilege, a namespace that does not exist). The CLI prints it and exits 2.
- ``SetupError``: the system refused an operation we rely on (netlink, firewall, a tool that
  failed). The CLI prints it and exits 1.

Bad input on the data path is never an exception: it is a counted drop (see core.stats).
Any other exception escaping is a bug.
"""


class TencryptError(Exception):
    exit_code = 1


class UsageError(TencryptError):
    exit_code = 2


class SetupError(TencryptError):
    exit_code = 1
