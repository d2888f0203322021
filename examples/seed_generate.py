"""The official SDK's generate snippet, unchanged except for the import line.

Run against the bundled server:  friendli-image serve &  python examples/seed_generate.py
"""

import os

from friendli_image import SyncFriendli

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
                "image": "https://huggingface.co/datasets/huggingface/documentation-images/resolve/main/diffusers/cat.png",
            },
        ],
    )

    # Handle response
    print(res)
