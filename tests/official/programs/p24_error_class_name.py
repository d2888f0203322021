"""Code that prints the class of the error it caught sees our class name."""
# differs: error-classes — the caught class has its own name (FriendliInvalidValueError), and is an SDKError
# official-prints: class: SDKError
# ours-prints: class: FriendliInvalidValueError

import os

from friendli import SyncFriendli, models

URL = os.environ["IMAGE_SERVER_URL"]

with SyncFriendli(token=os.environ["FRIENDLI_TOKEN"]) as friendli:
    try:
        friendli.container.image.generate(prompt="p", num_inference_steps=0, server_url=URL)
    except Exception as e:
        print("class:", type(e).__name__)
        print("is SDKError:", isinstance(e, models.SDKError), e.status_code)
