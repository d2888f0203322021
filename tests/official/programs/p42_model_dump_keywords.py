"""The result's pydantic methods with the keywords ported code passes."""

import json
import os

from friendli import SyncFriendli

URL = os.environ["IMAGE_SERVER_URL"]

with SyncFriendli(token=os.environ["FRIENDLI_TOKEN"]) as friendli:
    res = friendli.container.image.generate(prompt="a lighthouse", seed=3, server_url=URL)
    print(res.model_dump(exclude_none=True) == {"image": res.image})
    print(res.model_dump(exclude_unset=True, by_alias=True) == {"image": res.image})
    print(res.model_dump(include={"image"}) == {"image": res.image})
    print(res.model_dump(exclude={"image"}))
    print(res.model_dump(mode="json", exclude_defaults=True) == {"image": res.image.decode()})
    print(json.loads(res.model_dump_json(exclude_none=True)) == {"image": res.image.decode()})
    copied = res.model_copy()
    print("copy:", copied.image == res.image)
    print("deep copy:", res.model_copy(deep=True).image == res.image)
    print("dict:", sorted(dict(res)), dict(res)["image"] == res.image)
    print("fields:", sorted(type(res).model_fields))
