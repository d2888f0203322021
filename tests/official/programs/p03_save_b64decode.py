"""Save the generated image the way the official SDK's users do: b64decode(res.image)."""

import base64
import os

from friendli import SyncFriendli

URL = os.environ["IMAGE_SERVER_URL"]

with SyncFriendli(token=os.environ["FRIENDLI_TOKEN"]) as friendli:
    res = friendli.container.image.generate(prompt="a lighthouse at dawn", seed=7, server_url=URL)
    data = base64.b64decode(res.image)
    with open("lighthouse.jpg", "wb") as f:
        f.write(data)
    print("saved bytes:", len(data))
    print("jpeg:", data[:3] == b"\xff\xd8\xff")
