"""A weights generator of the wrong length: a 422 that names the count, both ways."""

import json
import os

from friendli import SyncFriendli, models

URL = os.environ["IMAGE_SERVER_URL"]
PIXEL = (
    "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQ"
    "DwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
)

with SyncFriendli(token=os.environ["FRIENDLI_TOKEN"]) as friendli:
    try:
        friendli.container.image.generate(
            prompt="p",
            control_images=[{"image": PIXEL}],
            controlnet_weights=(w for w in (0.5, 0.5)),
            server_url=URL,
        )
        print("no error")
    except models.SDKError as e:
        print("status:", e.status_code)
        detail = json.loads(e.body)["detail"]
        print("loc:", detail[0]["loc"][:2])
