"""Type-checked, not run: calls that must pass ``mypy --strict`` (see tests/test_typing.py)."""

from __future__ import annotations

from friendli_image import (
    AsyncFriendli,
    Batch,
    BatchResult,
    Endpoint,
    EndpointStats,
    FleetConfig,
    ImageResult,
    RetryConfig,
    SyncBatch,
    SyncFriendli,
)


def blocking() -> None:
    with SyncFriendli(token="t", server_url="http://localhost:8000", retries=2) as friendli:
        image = friendli.container.image
        result: ImageResult = image.generate(prompt="a fox", seed=7, num_inference_steps=10)
        edited: ImageResult = image.edit(image=b"...", prompt="at night", timeout_ms=5000)
        batch: SyncBatch = image.generate_batch(["a", "b"], concurrency=4, ordered=True)
        collected: BatchResult = batch.collect()
        print(result, edited, collected)


async def asynchronous() -> None:
    async with AsyncFriendli(retries=RetryConfig(max_attempts=2)) as client:
        image = client.container.image
        result: ImageResult = await image.generate(prompt="a fox", http_headers={"X-A": "1"})
        batch: Batch = image.edit_batch([{"image": b"...", "prompt": "p"}], rps=5.0)
        collected: BatchResult = await batch
        print(result, collected)


async def fleet() -> None:
    servers: list[str | Endpoint] = [
        "http://gpu1:8000",
        Endpoint("http://gpu2:8000", weight=2.0, max_connections=8),
    ]
    async with AsyncFriendli(server_url=servers, fleet=FleetConfig(health_path="/health")) as c:
        result: ImageResult = await c.container.image.generate(prompt="a fox")
        stats: tuple[EndpointStats, ...] = c.endpoints
        print(result.endpoint, stats)
    with SyncFriendli(server_url=servers) as friendli:
        print(friendli.endpoints[0].latency_p95)
