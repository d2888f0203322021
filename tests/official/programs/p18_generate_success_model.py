"""ContainerImageGenerateSuccess: isinstance, construction from base64, JSON round trip."""

import base64
import os

from friendli import SyncFriendli, models

URL = os.environ["IMAGE_SERVER_URL"]

with SyncFriendli(token=os.environ["FRIENDLI_TOKEN"]) as friendli:
    res = friendli.container.image.generate(prompt="a green boat", seed=12, server_url=URL)
    print("isinstance:", isinstance(res, models.ContainerImageGenerateSuccess))
    again = models.ContainerImageGenerateSuccess(image=res.image)
    print("rebuilt from bytes equal:", again == res, again.image == res.image)
    from_text = models.ContainerImageGenerateSuccess(image=res.image.decode())
    print("rebuilt from str:", from_text.image == res.image)
    parsed = models.ContainerImageGenerateSuccess.model_validate_json(res.model_dump_json())
    print("json round trip:", parsed.image == res.image)
    with open("boat.jpg", "wb") as f:
        f.write(base64.b64decode(again.image))
