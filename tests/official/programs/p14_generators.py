"""Generators for control_images and controlnet_weights."""

import base64
import os

from friendli import SyncFriendli

URL = os.environ["IMAGE_SERVER_URL"]
PIXEL = (
    "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQ"
    "DwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
)

with SyncFriendli(token=os.environ["FRIENDLI_TOKEN"]) as friendli:
    res = friendli.container.image.generate(
        prompt="a pixel city",
        seed=2,
        control_images=({"image": PIXEL} for _ in range(2)),
        controlnet_weights=(w / 4 for w in (1, 3)),
        server_url=URL,
    )
    with open("city.jpg", "wb") as f:
        f.write(base64.b64decode(res.image))
    print("ok")
