"""``python -m friendli_image``: the same as the ``friendli-image`` command."""

from ._cli import run

run()
