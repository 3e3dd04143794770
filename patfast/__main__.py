"""`python -m patfast ...` (also what torchrun runs: `torchrun ... -m patfast train ...`)."""

import sys

from patfast.cli import main

sys.exit(main())
