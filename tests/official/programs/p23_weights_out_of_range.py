"""A ControlNet weight above 1 is an SDKError 422."""

import os

from friendli import SyncFriendli, models

URL = os.environ["IMAGE_SERVER_URL"]
PIXEL = (
    "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQ"
    "DwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
)

with SyncFriendli(token=os.environ["FRIENDLI_TOKEN"]) as friendli:
    for steps in (0, 20):
        try:
            friendli.container.image.generate(
                prompt="p",
                num_inference_steps=steps,
                control_images=[{"image": PIXEL}],
                controlnet_weights=[1.5],
                server_url=URL,
            )
            print("no error")
        except models.SDKError as e:
            print("steps", steps, "status:", e.status_code)
