"""The seed document's generate snippet; only server_url= is added to the call.

The official SDK ignores a client-level server_url for container calls, so the URL goes
on the call, as users of the official SDK must write it.
"""
# server: static-image
# differs: repr — print(res) shows a one-line summary, not the whole base64 text
# official-prints: image=b'[A-Za-z0-9+/=]+'
# ours-prints: ImageResult\(format='png', 4x3, .*\)

import os

from friendli import SyncFriendli

with SyncFriendli(
    token=os.getenv("FRIENDLI_TOKEN", ""),
) as friendli:
    res = friendli.container.image.generate(
        prompt="An orange Lamborghini driving down a hill road at night with a beautiful ocean view in the background.",
        model="(adapter-route)",
        num_inference_steps=10,
        guidance_scale=3.5,
        control_images=[
            {
                "image": "https://huggingface.co/datasets/huggingface/documentation-images/resolve/main/diffusers/cat.png",
            },
        ],
        server_url=os.environ["IMAGE_SERVER_URL"],
    )
    # Handle response
    print(res)
