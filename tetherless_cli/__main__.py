"""``python -m tetherless_cli``: the same as the ``tetherless`` script."""

import sys

from tetherless_cli.main import main

sys.exit(main())
