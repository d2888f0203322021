"""server_idx= and url_params= are accepted (they mean nothing for a container call)."""

import base64
import hashlib
import os
import warnings

from friendli import SyncFriendli

URL = os.environ["IMAGE_SERVER_URL"]

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    client = SyncFriendli(token=os.environ["FRIENDLI_TOKEN"], server_idx=0, url_params={})
with client as friendli:
    res = friendli.container.image.generate(prompt="indexed", seed=1, server_url=URL)
    print("sha256:", hashlib.sha256(base64.b64decode(res.image)).hexdigest())
