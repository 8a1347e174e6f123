"""``python -m dtypelint`` runs the command line."""

import sys

from dtypelint.cli import main

sys.exit(main())
