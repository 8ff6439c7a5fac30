"""``python -m edgesparse ...``: the same as the ``edgesparse`` command."""
import sys

from edgesparse.apps.cli import main

sys.exit(main())
