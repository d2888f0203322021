"""Type-checked, not run: each line marked ``# E`` must be a mypy error (tests/test_typing.py)."""

from __future__ import annotations

from friendli_image import AsyncFriendli, SyncFriendli


def blocking() -> None:
    friendli = SyncFriendli(tokn="t")  # E
    SyncFriendli(max_connections="64")  # E
    image = friendli.container.image
    image.generate(promt="a fox")  # E
    image.generate(prompt="a fox", seed="7")  # E
    image.edit(image=b"...", prompt="p", guidance="2")  # E
    image.generate_batch(["a"], concurency=4)  # E
    image.generate_batch(["a"], rps="fast")  # E
    number: int = image.generate(prompt="a fox")  # E
    print(number)


async def asynchronous() -> None:
    client = AsyncFriendli(server_url=8000)  # E
    await client.container.image.generate(prompt="p", timeout_ms="5s")  # E
    client.container.image.edit_batch([], ordered="yes", stop_on_fatl=False)  # E
