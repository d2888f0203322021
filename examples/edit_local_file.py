"""Edit a local image (any of: a path, bytes, an open file, a PIL image) and save it.

friendli-image serve --port 8000 &   # or point FRIENDLI_SERVER_URL at your Friendli Container
python examples/edit_local_file.py input.jpg "make it snow"
"""

import argparse
import sys
from pathlib import Path

from friendli_image import FriendliError, SyncFriendli


def main(source: Path, prompt: str) -> int:
    if not source.is_file():
        print(f"{source}: no such file", file=sys.stderr)
        return 2
    with SyncFriendli() as friendli:
        try:
            res = friendli.container.image.edit(image=source, prompt=prompt, seed=1)
        except FriendliError as exc:
            print(f"edit failed: {exc}", file=sys.stderr)
            return 1
    print(f"wrote {res.save(source.with_name(source.stem + '-edited'))}")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Edit a local image and save the result.")
    parser.add_argument("image", type=Path, help="the image file to edit")
    parser.add_argument("prompt", help='what to change, e.g. "make it snow"')
    args = parser.parse_args()
    sys.exit(main(args.image, args.prompt))
