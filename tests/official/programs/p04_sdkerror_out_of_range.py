"""except models.SDKError around an out-of-range value reads status_code and raw_response."""

import os

from friendli import SyncFriendli, models

URL = os.environ["IMAGE_SERVER_URL"]

with SyncFriendli(token=os.environ["FRIENDLI_TOKEN"]) as friendli:
    try:
        friendli.container.image.generate(prompt="p", num_inference_steps=51, server_url=URL)
    except models.SDKError as e:
        print("caught SDKError:", e.status_code)
        print("raw status:", e.raw_response.status_code)
        print("names the field:", "num_inference_steps" in e.raw_response.text)
        print("body is str:", isinstance(e.body, str), "num_inference_steps" in e.body)
        print(
            "json content:",
            e.raw_response.headers.get("content-type", "").startswith("application/json"),
        )
        print("message is str:", isinstance(e.message, str) and bool(e.message))
