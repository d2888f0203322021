"""edit(image=...) given a generator of image dicts."""

import base64
import os

from friendli import SyncFriendli

URL = os.environ["IMAGE_SERVER_URL"]
PIXEL = (
    "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQ"
    "DwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
)

with SyncFriendli(token=os.environ["FRIENDLI_TOKEN"]) as friendli:
    res = friendli.container.image.edit(
        image=({"image": PIXEL} for _ in range(3)), prompt="three", seed=3, server_url=URL
    )
    with open("three.jpg", "wb") as f:
        f.write(base64.b64decode(res.image))
    print("ok")
