"""`python -m engine ...` (and `torchrun ... -m engine train cfg.yaml`)."""

import sys

from engine.cli import main

if __name__ == "__main__":
    sys.exit(main())
