import sys

from ocula.synth import main

sys.exit(main())
