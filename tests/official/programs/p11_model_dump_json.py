"""model_dump_json() and model_dump() give the official JSON and dict."""

import base64
import hashlib
import json
import os

from friendli import SyncFriendli

URL = os.environ["IMAGE_SERVER_URL"]

with SyncFriendli(token=os.environ["FRIENDLI_TOKEN"]) as friendli:
    res = friendli.container.image.generate(prompt="a blue door", seed=11, server_url=URL)
    text = res.model_dump_json()
    with open("result.json", "w") as f:
        f.write(text)
    print("json sha256:", hashlib.sha256(text.encode()).hexdigest())
    print("keys:", sorted(json.loads(text)))
    dumped = res.model_dump()
    print("dump keys:", sorted(dumped), type(dumped["image"]).__name__)
    print("dump == image:", dumped["image"] == res.image)
    print("json mode:", type(res.model_dump(mode="json")["image"]).__name__)
    print("indent:", res.model_dump_json(indent=2).splitlines()[0])
    print("decodes:", base64.b64decode(json.loads(text)["image"])[:2] == b"\xff\xd8")
