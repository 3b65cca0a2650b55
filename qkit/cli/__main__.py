import sys

from qkit.cli.main import main

sys.exit(main())
