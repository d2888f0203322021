"""The seed document's edit snippet; only server_url= is added to the call."""
# server: static-image
# differs: repr — print(res) shows a one-line summary, not the whole base64 text
# official-prints: image=b'[A-Za-z0-9+/=]+'
# ours-prints: ImageResult\(format='png', 4x3, .*\)

import os

from friendli import SyncFriendli

with SyncFriendli(
    token=os.getenv("FRIENDLI_TOKEN", ""),
) as friendli:
    res = friendli.container.image.edit(
        image=[
            {
                "image": "https://huggingface.co/datasets/huggingface/documentation-images/resolve/main/diffusers/cat.png",
            },
        ],
        prompt="Add a red sports car in the foreground.",
        model="(adapter-route)",
        num_inference_steps=20,
        guidance_scale=0,
        server_url=os.environ["IMAGE_SERVER_URL"],
    )
    # Handle response
    print(res)
