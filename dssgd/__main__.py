import sys

from dssgd.cli import main

sys.exit(main())
