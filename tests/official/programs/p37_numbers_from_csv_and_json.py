"""Numbers from a CSV file (text) and a JSON config (20.0) are taken as numbers."""

import base64
import csv
import io
import json
import os

from friendli import SyncFriendli

URL = os.environ["IMAGE_SERVER_URL"]
ROWS = "prompt,seed,steps,guidance\na red kite,11,8,1.5\na blue kite,12,9,2\n"
CONFIG = json.loads('{"num_inference_steps": 8.0, "seed": 11.0}')

with SyncFriendli(token=os.environ["FRIENDLI_TOKEN"]) as friendli:
    for row in csv.DictReader(io.StringIO(ROWS)):
        res = friendli.container.image.generate(
            prompt=row["prompt"],
            seed=row["seed"],
            num_inference_steps=row["steps"],
            guidance_scale=row["guidance"],
            server_url=URL,
        )
        with open(f"seed-{row['seed']}.jpg", "wb") as f:
            f.write(base64.b64decode(res.image))
    from_config = friendli.container.image.generate(prompt="a red kite", server_url=URL, **CONFIG)
    as_ints = friendli.container.image.generate(
        prompt="a red kite", seed=11, num_inference_steps=8, guidance_scale=1.5, server_url=URL
    )
    print("config with guidance 0:", from_config.image != as_ints.image)
    try:
        friendli.container.image.generate(prompt="a red kite", seed=11.5, server_url=URL)
    except Exception as exc:
        print("a fractional seed is refused:", "seed" in str(exc))
