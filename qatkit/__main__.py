"""``python -m qatkit``: the ``qatkit`` command."""

import sys

from qatkit.cli.main import main

sys.exit(main())
