"""``python -m ctc_multi compare``: the same command line as the ``ctc-multi`` console script."""

import sys

from .cli import main

sys.exit(main())
