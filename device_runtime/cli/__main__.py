"""``python -m device_runtime.cli``: the ``edgeroute`` console script."""

import sys

from device_runtime.cli.main import main

sys.exit(main())
