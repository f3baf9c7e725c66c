"""python -m tools.convert_weights ... (see cli.py)."""

import sys

from tools.convert_weights.cli import main

sys.exit(main())
