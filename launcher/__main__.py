"""``python -m launcher``: the same CLI as the ``launcher`` command."""
import sys

from launcher.cli import main

sys.exit(main())
