"""x_friendli_team= in the constructor (the official SDK warns without it)."""

import base64
import hashlib
import os

from friendli import SyncFriendli

URL = os.environ["IMAGE_SERVER_URL"]

with SyncFriendli(token=os.environ["FRIENDLI_TOKEN"], x_friendli_team="team-42") as friendli:
    res = friendli.container.image.generate(prompt="a team photo", seed=1, server_url=URL)
    print("sha256:", hashlib.sha256(base64.b64decode(res.image)).hexdigest())
