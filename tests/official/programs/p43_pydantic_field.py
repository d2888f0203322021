"""The result type as a field of the application's own pydantic model."""

import json
import os

from friendli import SyncFriendli, models
from pydantic import BaseModel

URL = os.environ["IMAGE_SERVER_URL"]


class Stored(BaseModel):
    name: str
    result: models.ContainerImageGenerateSuccess


with SyncFriendli(token=os.environ["FRIENDLI_TOKEN"]) as friendli:
    res = friendli.container.image.generate(prompt="a lighthouse", seed=3, server_url=URL)
    stored = Stored(name="first", result=res)
    dumped = json.loads(stored.model_dump_json())
    print(sorted(dumped), dumped["result"] == {"image": res.image.decode()})
    back = Stored.model_validate_json(stored.model_dump_json())
    print("round trip:", back.result.image == res.image)
    print("python dump:", stored.model_dump()["result"] == {"image": res.image})
    schema = Stored.model_json_schema()
    print("schema has result:", "result" in schema["properties"])
