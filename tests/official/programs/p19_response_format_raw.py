"""response_format="raw" gives a PNG; Pillow opens what b64decode(res.image) returns."""

import base64
import io
import os

from friendli import SyncFriendli
from PIL import Image

URL = os.environ["IMAGE_SERVER_URL"]

with SyncFriendli(token=os.environ["FRIENDLI_TOKEN"]) as friendli:
    res = friendli.container.image.generate(
        prompt="a yellow bird", seed=13, response_format="raw", server_url=URL
    )
    picture = Image.open(io.BytesIO(base64.b64decode(res.image)))
    print("format:", picture.format, "size:", picture.size)
    picture.save("bird.png")
