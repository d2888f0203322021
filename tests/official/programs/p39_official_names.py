"""Names user code reaches in friendli.models and friendli.utils exist and work."""

import logging
import os

from friendli import SyncFriendli, models, utils

URL = os.environ["IMAGE_SERVER_URL"]

for name in (
    "FriendliCoreError",
    "ValidationError",
    "ContainerImageGenerationBody",
    "ContainerImageGenerationBodyTypedDict",
    "ContainerImageEditBody",
    "ContainerImageEditBodyTypedDict",
    "ContainerImageGenerateSuccessTypedDict",
    "ContainerImageGenerationBodyResponseFormat",
    "ContainerImageEditBodyResponseFormat",
):
    print(name, hasattr(models, name))
print("Logger", hasattr(utils, "Logger"))

body: models.ContainerImageGenerationBodyTypedDict = {"prompt": "a red kite", "seed": 5}


class PrintLogger:
    """Anything with .debug() is a utils.Logger (a Protocol in the official SDK)."""

    def __init__(self) -> None:
        self.calls = 0

    def debug(self, msg: str, *args: object, **kwargs: object) -> None:
        self.calls += 1


logger: utils.Logger = PrintLogger()
std: utils.Logger = logging.getLogger("mine")

with SyncFriendli(token=os.environ["FRIENDLI_TOKEN"], debug_logger=logger) as friendli:
    res = friendli.container.image.generate(**body, server_url=URL)
    print("generated:", len(res.image) > 0, "logged:", logger.calls > 0)

request = models.ContainerImageGenerationBody(prompt="a red kite", num_inference_steps=12)
print("request fields:", sorted(request.model_dump()))
print("steps:", request.num_inference_steps)
edit = models.ContainerImageEditBody(image={"image": "https://example.com/x.png"}, prompt="p")
print("edit image:", edit.image.image if not isinstance(edit.image, list) else "list")
