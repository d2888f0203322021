"""Generate many images concurrently with one AsyncFriendli and save them.

friendli-image serve --port 8000 &   # or point FRIENDLI_SERVER_URL at your Friendli Container
python examples/async_many.py [OUT_DIR]
"""

import argparse
import asyncio
from pathlib import Path

from friendli_image import AsyncFriendli, FriendliError

PROMPTS = [f"a watercolor lighthouse, variation {n}" for n in range(16)]


async def main(out: Path) -> int:
    async with AsyncFriendli(max_connections=8) as client:
        results = await asyncio.gather(
            *(client.container.image.generate(prompt=p, seed=n) for n, p in enumerate(PROMPTS)),
            return_exceptions=True,
        )
    failed = 0
    for n, result in enumerate(results):
        if isinstance(result, FriendliError):
            print(f"{n}: failed: {result}")
            failed += 1
        elif isinstance(result, BaseException):
            raise result
        else:
            print(f"{n}: {result.save(out / f'lighthouse-{n}')}")
    return 1 if failed else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Generate 16 images concurrently.")
    parser.add_argument("out_dir", nargs="?", default="out", help="where to save (default: out)")
    out_dir = Path(parser.parse_args().out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    raise SystemExit(asyncio.run(main(out_dir)))
