"""``python -m denovo3d`` runs the command-line program."""

import sys

from denovo3d.cli import main

sys.exit(main())
