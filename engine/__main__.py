"""`python -m lmengine ...` is the `lmengine` command line."""
import sys

from .cli import main

sys.exit(main())
