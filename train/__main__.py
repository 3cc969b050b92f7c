"""``python -m train`` / ``accelerate launch -m train``."""

import sys

from .cli import main

sys.exit(main())
