"""A 200 that is not the API (an HTML page) is caught by except models.SDKError."""
# script: [Action.status(200, body=b"<html><body>welcome to nginx</body></html>", content_type="text/html")]

import os

from friendli import SyncFriendli, models

URL = os.environ["IMAGE_SERVER_URL"]

with SyncFriendli(token=os.environ["FRIENDLI_TOKEN"]) as friendli:
    try:
        friendli.container.image.generate(prompt="a boat", server_url=URL)
        print("no error")
    except models.SDKError as e:
        print("SDKError:", e.status_code)
        print("content-type:", e.headers.get("content-type"))
        print("raw:", e.raw_response.status_code, "nginx" in e.raw_response.text)
        print("body:", e.body)
