"""`python -m server ...` is `mmkd-serve ...`."""

import sys

from server.cli import main

sys.exit(main())
