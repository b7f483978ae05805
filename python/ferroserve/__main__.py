import sys

from ferroserve.cli import main

sys.exit(main())
