"""``python -m balanced_sam.configs``: the ``bsam configs`` command on its own."""

import sys

from balanced_sam.configs import cli_main

sys.exit(cli_main())
