"""The TypedDict names for image inputs, used as annotations."""

import base64
import os

from friendli import SyncFriendli, models

URL = os.environ["IMAGE_SERVER_URL"]
PIXEL = (
    "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQ"
    "DwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
)

one: models.ImageInputTypedDict = {"image": PIXEL}
several: models.ContainerImageEditBodyImageTypedDict = [one, {"image": PIXEL}]

with SyncFriendli(token=os.environ["FRIENDLI_TOKEN"]) as friendli:
    res = friendli.container.image.edit(image=several, prompt="typed", seed=8, server_url=URL)
    with open("typed.jpg", "wb") as f:
        f.write(base64.b64decode(res.image))
    print("ok")
