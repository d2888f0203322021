"""``python -m friendli_image``: the same as the ``friendli-image`` command."""

import sys

from ._cli import main

sys.exit(main())
