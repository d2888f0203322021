"""Edit a local image (any of: a path, bytes, an open file, a PIL image) and save it.

python examples/edit_local_file.py input.jpg "make it snow"
"""

import sys
from pathlib import Path

from friendli_image import FriendliError, SyncFriendli


def main(source: str, prompt: str) -> int:
    with SyncFriendli() as friendli:
        try:
            res = friendli.container.image.edit(image=Path(source), prompt=prompt, seed=1)
        except FriendliError as exc:
            print(f"edit failed: {exc}", file=sys.stderr)
            return 1
    print(f"wrote {res.save(Path(source).with_name(Path(source).stem + '-edited'))}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
