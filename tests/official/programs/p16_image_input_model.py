"""models.ImageInput objects for control_images and for edit(image=[...])."""

import base64
import os

from friendli import SyncFriendli, models

URL = os.environ["IMAGE_SERVER_URL"]
PIXEL = (
    "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQ"
    "DwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
)

with SyncFriendli(token=os.environ["FRIENDLI_TOKEN"]) as friendli:
    pixel = models.ImageInput(image=PIXEL)
    print("image field:", pixel.image == PIXEL)
    res = friendli.container.image.generate(
        prompt="guided", seed=4, control_images=[pixel], controlnet_weights=[0.8], server_url=URL
    )
    edited = friendli.container.image.edit(
        image=[pixel, models.ImageInput(image=PIXEL)], prompt="two pixels", seed=4, server_url=URL
    )
    for name, result in (("guided.jpg", res), ("two.jpg", edited)):
        with open(name, "wb") as f:
            f.write(base64.b64decode(result.image))
