"""Generate many images concurrently with one AsyncFriendli and save them.

friendli-image serve &   # or point FRIENDLI_SERVER_URL at your Friendli Container
python examples/async_many.py
"""

import asyncio
from pathlib import Path

from friendli_image import AsyncFriendli, FriendliError

PROMPTS = [f"a watercolor lighthouse, variation {n}" for n in range(16)]


async def main(out: Path) -> None:
    async with AsyncFriendli(max_connections=8) as client:
        results = await asyncio.gather(
            *(client.container.image.generate(prompt=p, seed=n) for n, p in enumerate(PROMPTS)),
            return_exceptions=True,
        )
    for n, result in enumerate(results):
        if isinstance(result, FriendliError):
            print(f"{n}: failed: {result}")
        elif isinstance(result, BaseException):
            raise result
        else:
            print(f"{n}: {result.save(out / f'lighthouse-{n}')}")


if __name__ == "__main__":
    out_dir = Path("out")
    out_dir.mkdir(exist_ok=True)
    asyncio.run(main(out_dir))
