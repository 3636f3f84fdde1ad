"""``python -m dssgd.aggregator`` is ``dssgd aggregator``."""

import sys

from dssgd.cli import main

sys.exit(main(["aggregator", *sys.argv[1:]]))
