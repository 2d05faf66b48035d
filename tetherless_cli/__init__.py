"""The ``tetherless`` command: the one front door for the relay's operators and the client's users.

A package above both :mod:`relay` and :mod:`protocol.client` (docs/decisions/0010-cli-package.md): neither
imports it. :mod:`tetherless_cli.main` builds the parser from light declarations and imports a command's
module only when that command runs.
"""
