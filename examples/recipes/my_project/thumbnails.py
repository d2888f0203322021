"""The code under test: a function of "your" application that uses the SDK."""

from __future__ import annotations

from pathlib import Path

from friendli_image import AsyncFriendli


async def draw_all(client: AsyncFriendli, prompts: list[str], out_dir: Path) -> list[Path]:
    """Draw one picture per prompt into ``out_dir``; a failed prompt is left out."""
    result = await client.container.image.generate_batch(prompts, out_dir=out_dir)
    return [item.path for item in result.succeeded if item.path is not None]
