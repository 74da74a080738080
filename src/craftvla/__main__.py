import sys

from craftvla.cli import main

sys.exit(main())
