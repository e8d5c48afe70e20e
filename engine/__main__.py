"""`python -m engine ...` is the `lmengine` command line."""
import sys

from .cli import main

sys.exit(main())
