"""HTTP_PROXY from the environment is used, as httpx does: the call goes through the proxy."""

import os

os.environ["HTTP_PROXY"] = os.environ["IMAGE_SERVER_URL"]
for name in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy"):
    os.environ.pop(name, None)

from friendli import SyncFriendli, models  # noqa: E402

with SyncFriendli(token=os.environ["FRIENDLI_TOKEN"]) as friendli:
    try:
        # Nothing listens at DEAD_SERVER_URL: only the proxy can answer.
        res = friendli.container.image.generate(
            prompt="a kite", seed=2, server_url=os.environ["DEAD_SERVER_URL"]
        )
        print("through the proxy:", len(res.image))
    except (models.SDKError, ConnectionError) as e:
        print("direct:", type(e).__mro__[-2].__name__)
    except Exception as e:  # httpx.ConnectError in the official SDK
        print("direct:", type(e).__mro__[-2].__name__)
