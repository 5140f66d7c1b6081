"""`python -m realsr_r1.data build --hr HR_DIR --out DATA_DIR`: a training set from HR images (the
code: realsr_r1/training/data.py)."""

import sys

from .training.data import main

if __name__ == "__main__":
    sys.exit(main())
