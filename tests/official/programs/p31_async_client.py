"""AsyncFriendli: generate and edit with await, saved via b64decode."""

import asyncio
import base64
import os

from friendli import AsyncFriendli

URL = os.environ["IMAGE_SERVER_URL"]


async def main() -> None:
    async with AsyncFriendli(token=os.environ["FRIENDLI_TOKEN"]) as friendli:
        res = await friendli.container.image.generate(prompt="async", seed=21, server_url=URL)
        edited = await friendli.container.image.edit(
            image={"image": "data:image/jpeg;base64," + res.image.decode()},
            prompt="more async",
            seed=22,
            server_url=URL,
        )
        for name, result in (("a.jpg", res), ("b.jpg", edited)):
            with open(name, "wb") as f:
                f.write(base64.b64decode(result.image))
        print("done")


asyncio.run(main())
