"""A FastAPI service that draws pictures: one AsyncFriendli, opened in the lifespan.

Every request shares the client (and its connection pool); it is closed when the
service stops. Run it with ``uvicorn fastapi_app:app`` and ask for
``/images?prompt=a+red+fox&seed=7``; ``FRIENDLI_SERVER_URL`` and ``FRIENDLI_TOKEN``
name the server and its token.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, HTTPException, Request, Response

from friendli_image import (
    AsyncFriendli,
    FriendliAPIError,
    FriendliUnprocessableEntityError,
    FriendliValidationError,
)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    async with AsyncFriendli() as client:
        app.state.friendli = client
        yield


app = FastAPI(lifespan=lifespan)


@app.get("/images")
async def image(request: Request, prompt: str, seed: int | None = None) -> Response:
    """The picture of ``prompt``, as the image file the server made."""
    client: AsyncFriendli = request.app.state.friendli
    try:
        res = await client.container.image.generate(prompt=prompt, seed=seed)
    # A value the SDK or the server refuses (a seed out of range, steps over 50).
    except (FriendliValidationError, FriendliUnprocessableEntityError) as exc:
        raise HTTPException(status_code=422, detail=str(exc)) from None
    except FriendliAPIError as exc:  # the image server failed, after the retries
        raise HTTPException(status_code=502, detail=str(exc)) from None
    return Response(res.data, media_type=res.content_type)
