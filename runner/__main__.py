"""`python -m runner erase ...`: the command line (runner/cli.py)."""
import sys

from runner.cli import main

sys.exit(main())
