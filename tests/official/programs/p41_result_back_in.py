"""A result's image goes back in as the official models take it (base64 bytes become text)."""

import os

from friendli import SyncFriendli, models

URL = os.environ["IMAGE_SERVER_URL"]

with SyncFriendli(token=os.environ["FRIENDLI_TOKEN"]) as friendli:
    res = friendli.container.image.generate(prompt="a lighthouse", seed=3, server_url=URL)
    given = models.ImageInput(image=res.image)
    print("ImageInput holds text:", isinstance(given.image, str))
    for image in ({"image": res.image}, given, [{"image": res.image}], [given]):
        try:
            out = friendli.container.image.edit(
                image=image, prompt="add snow", seed=4, server_url=URL
            )
            print("edited:", len(out.image))
        except (models.SDKError, ValueError):
            print("refused")
