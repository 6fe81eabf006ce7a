import sys

from udrv.cli.main import main

sys.exit(main())
