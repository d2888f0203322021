"""A client whose first call happens in an atexit hook lets the process exit."""

import atexit
import os

from friendli import SyncFriendli

URL = os.environ["IMAGE_SERVER_URL"]
friendli = SyncFriendli(token=os.environ["FRIENDLI_TOKEN"])


def report() -> None:
    res = friendli.container.image.generate(prompt="a kite", seed=2, server_url=URL)
    print("at exit:", len(res.image), flush=True)


atexit.register(report)
print("main done")
