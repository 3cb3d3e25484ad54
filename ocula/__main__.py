import sys

from ocula.cli import main

sys.exit(main())
