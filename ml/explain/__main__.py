"""Entry point of `python -m ml.explain`; see `ml.explain.cli`."""

import sys

from ml.explain.cli import main

sys.exit(main())
