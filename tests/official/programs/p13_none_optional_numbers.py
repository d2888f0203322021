"""num_inference_steps=None and guidance_scale=None omit the fields (server defaults)."""

import base64
import os

from friendli import SyncFriendli

URL = os.environ["IMAGE_SERVER_URL"]

with SyncFriendli(token=os.environ["FRIENDLI_TOKEN"]) as friendli:
    res = friendli.container.image.generate(
        prompt="a field of tulips",
        seed=9,
        num_inference_steps=None,
        guidance_scale=None,
        server_url=URL,
    )
    default = friendli.container.image.generate(prompt="a field of tulips", seed=9, server_url=URL)
    with open("tulips.jpg", "wb") as f:
        f.write(base64.b64decode(res.image))
    print("same as the defaults:", res.image == default.image)
    edited = friendli.container.image.edit(
        image={"image": "data:image/jpeg;base64," + res.image.decode()},
        prompt="more tulips",
        num_inference_steps=None,
        guidance_scale=None,
        seed=None,
        server_url=URL,
    )
    with open("edited.jpg", "wb") as f:
        f.write(base64.b64decode(edited.image))
