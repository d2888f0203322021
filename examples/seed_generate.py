"""The official SDK's generate snippet, with only the import line changed.

The control image is a URL that the server fetches. The default one is on huggingface.co,
so the server needs internet access; to run offline, pass the URL of an image on your
network (for example one served with ``python -m http.server``)::

    friendli-image serve --port 8000 &   # or set FRIENDLI_SERVER_URL
    python examples/seed_generate.py [CONTROL_IMAGE_URL]
"""

import argparse
import os
import sys

from friendli_image import FriendliError, SyncFriendli

CAT = "https://huggingface.co/datasets/huggingface/documentation-images/resolve/main/diffusers/cat.png"

parser = argparse.ArgumentParser(description="Generate one image with a control image.")
parser.add_argument(
    "control_image", nargs="?", default=CAT, help="URL of the control image (default: %(default)s)"
)
control_image = parser.parse_args().control_image

try:
    with SyncFriendli(
        token=os.getenv("FRIENDLI_TOKEN", ""),
    ) as friendli:
        res = friendli.container.image.generate(
            prompt="An orange Lamborghini driving down a hill road at night with a beautiful ocean view in the background.",  # noqa: E501
            model="(adapter-route)",
            num_inference_steps=10,
            guidance_scale=3.5,
            control_images=[
                {
                    "image": control_image,
                },
            ],
        )

        # Handle response
        print(res)
except FriendliError as exc:
    sys.exit(f"generate failed: {exc}")
