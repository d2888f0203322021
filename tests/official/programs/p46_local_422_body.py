"""A value the server refuses gives the server's 422 body, to the byte."""

import os

from friendli import SyncFriendli, models

URL = os.environ["IMAGE_SERVER_URL"]
PNG = "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4z8AAAAMBAQDJ/pLvAAAAAElFTkSuQmCC"

calls = [
    {"num_inference_steps": 51},
    {"num_inference_steps": 0},
    {"control_images": [{"image": PNG}], "controlnet_weights": [1.5]},
    {"control_images": [{"image": PNG}], "controlnet_weights": [0.5, 0.5]},
]
with SyncFriendli(token=os.environ["FRIENDLI_TOKEN"]) as friendli:
    for kwargs in calls:
        try:
            friendli.container.image.generate(prompt="p", **kwargs, server_url=URL)
            print("no error")
        except models.SDKError as e:
            print(e.status_code, e.headers.get("content-type"), e.body)
            print(e.raw_response.json() == {"detail": e.raw_response.json()["detail"]})
