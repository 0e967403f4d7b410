"""``python -m client``: the ``kgpu`` command."""

import sys

from client.cli import main

sys.exit(main())
