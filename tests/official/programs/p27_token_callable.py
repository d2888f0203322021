"""A callable token, called for the request."""
# server: token=from-a-callable

import base64
import hashlib
import os

from friendli import SyncFriendli

URL = os.environ["IMAGE_SERVER_URL"]

with SyncFriendli(token=lambda: "from-a-callable") as friendli:
    res = friendli.container.image.generate(prompt="callable", seed=1, server_url=URL)
    print("sha256:", hashlib.sha256(base64.b64decode(res.image)).hexdigest())
