"""debug_logger= takes a logging.Logger; the token appears in nothing the program prints."""
# server: token=secret-token-123

import base64
import hashlib
import logging
import os

from friendli import SyncFriendli

URL = os.environ["IMAGE_SERVER_URL"]
logger = logging.getLogger("ported")

with SyncFriendli(token="secret-token-123", debug_logger=logger) as friendli:
    res = friendli.container.image.generate(prompt="logged", seed=1, server_url=URL)
    print("sha256:", hashlib.sha256(base64.b64decode(res.image)).hexdigest())
