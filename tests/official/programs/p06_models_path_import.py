"""from friendli.models import SDKError: a negative seed is refused with 422."""

import os

from friendli import SyncFriendli
from friendli.models import SDKError

URL = os.environ["IMAGE_SERVER_URL"]

with SyncFriendli(token=os.environ["FRIENDLI_TOKEN"]) as friendli:
    try:
        friendli.container.image.generate(prompt="p", seed=-1, server_url=URL)
        print("no error")
    except SDKError as e:
        print("status:", e.status_code)
        print("mentions seed:", "seed" in e.body)
