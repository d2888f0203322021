"""Chain a generated image into an edit through a data: URI built from res.image."""

import base64
import os

from friendli import SyncFriendli

URL = os.environ["IMAGE_SERVER_URL"]

with SyncFriendli(token=os.environ["FRIENDLI_TOKEN"]) as friendli:
    first = friendli.container.image.generate(prompt="a quiet street", seed=5, server_url=URL)
    uri = "data:image/jpeg;base64," + first.image.decode()
    edited = friendli.container.image.edit(
        image={"image": uri}, prompt="add rain", seed=6, server_url=URL
    )
    with open("edited.jpg", "wb") as f:
        f.write(base64.b64decode(edited.image))
    print("edited differs from input:", edited.image != first.image)
