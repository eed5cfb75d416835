"""``python -m hybridcn.cli``: the same as the ``hybridcn`` command."""

import sys

from hybridcn.cli import main

sys.exit(main())
