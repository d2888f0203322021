"""A Flask app that draws pictures with one SyncFriendli, shared by every request.

`SyncFriendli` is safe to share between threads: the worker threads of the process
share its connection pool. Run it with ``flask --app flask_app run`` and ask for
``/images?prompt=a+red+fox&seed=7``; ``FRIENDLI_SERVER_URL`` and ``FRIENDLI_TOKEN``
name the server and its token.
"""

from __future__ import annotations

from flask import Flask, Response, abort, request

from friendli_image import (
    FriendliAPIError,
    FriendliUnprocessableEntityError,
    FriendliValidationError,
    SyncFriendli,
)

app = Flask(__name__)
friendli = SyncFriendli()  # one per process; closed at exit (or call friendli.close())


@app.get("/images")
def image() -> Response:
    """The picture of the ``prompt`` query parameter, as the image file the server made."""
    prompt = request.args.get("prompt", "")
    seed = request.args.get("seed", type=int)
    try:
        res = friendli.container.image.generate(prompt=prompt, seed=seed)
    # A value the SDK or the server refuses (a seed out of range, steps over 50).
    except (FriendliValidationError, FriendliUnprocessableEntityError) as exc:
        abort(422, description=str(exc))
    except FriendliAPIError as exc:  # the image server failed, after the retries
        abort(502, description=str(exc))
    return Response(res.data, mimetype=res.content_type)
