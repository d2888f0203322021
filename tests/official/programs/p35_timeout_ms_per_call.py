"""timeout_ms= per call, generous: a slow answer (1 s) still arrives."""
# script: [Action.delay(1.0)]

import base64
import hashlib
import os

from friendli import SyncFriendli

URL = os.environ["IMAGE_SERVER_URL"]

with SyncFriendli(token=os.environ["FRIENDLI_TOKEN"]) as friendli:
    res = friendli.container.image.generate(
        prompt="slow", seed=1, timeout_ms=30000, server_url=URL, http_headers={"X-Trace": "1"}
    )
    print("sha256:", hashlib.sha256(base64.b64decode(res.image)).hexdigest())
