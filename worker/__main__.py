"""``python -m dssgd.worker`` is ``dssgd worker``."""

import sys

from dssgd.cli import main

sys.exit(main(["worker", *sys.argv[1:]]))
