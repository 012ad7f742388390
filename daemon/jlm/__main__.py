import sys

from jlm.cli import main

sys.exit(main())
