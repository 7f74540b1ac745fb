import sys

from vla.cli import main

sys.exit(main())
