"""``python -m jaxunlearn.cli``: the same as the ``jaxunlearn`` command."""

import sys

from jaxunlearn.cli import main

sys.exit(main())
