"""Schemathesis hooks for the contract run (loaded through ``SCHEMATHESIS_HOOKS``).

The built-in ``positive_data_acceptance`` check fails on every 4xx to a body the schema
allows. The file states some limits only in prose, which a JSON schema cannot carry
(steps in [1, 50], weights in [0, 1] and one per control image, images "in a supported
image format"), and the project documents two more (docs: the seed range and a
non-empty edit list). ``positive_data_within_stated_limits`` is that check minus exactly
those: a 422 passes only when every error it lists is one of them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import schemathesis
from schemathesis import CheckContext
from schemathesis.core.transport import Response
from schemathesis.generation.case import Case


def stated_limit(detail: Mapping[str, Any]) -> bool:
    """Whether one 422 error names a limit the spec states in prose or the docs document."""
    loc: Sequence[object] = detail.get("loc", ())
    kind = detail.get("type")
    field = loc[1] if len(loc) > 1 and loc[0] == "body" else None
    if field == "num_inference_steps":
        # "Supported range: [1, 50]."
        return len(loc) == 2 and kind in {"greater_than_equal", "less_than_equal"}
    if field == "controlnet_weights":
        # "Each value must be within [0, 1]" and "the list length must match the number
        # of control images".
        return kind == "value_error"
    if field in {"image", "control_images"} and loc[-1] == "image":
        # ImageInput: "a URL or a base64-encoded string"; "Must be in a supported image
        # format". Whether a string decodes to an image is beyond the schema.
        return kind == "value_error"
    if field == "image" and len(loc) == 2:
        # docs: an empty edit list is refused (there is nothing to edit).
        return kind == "value_error"
    if field == "seed":
        # docs: the seed is in [0, 2**32 - 1] (the spec gives no range).
        return len(loc) == 2 and kind in {"greater_than_equal", "less_than_equal"}
    return False


def unexplained_rejection(status: int, text: str) -> str | None:
    """Why a 4xx to a spec-valid body is not explained by a stated limit (None: it is)."""
    if status == 422:
        try:
            details = json.loads(text)["detail"]
        except (ValueError, KeyError, TypeError):
            return f"422 without a FastAPI-style detail list: {text[:300]}"
        others = [detail for detail in details if not stated_limit(detail)]
        if not others:
            return None
        return f"422 for reasons the spec does not state: {json.dumps(others)[:600]}"
    return f"{status} to a body the spec allows: {text[:300]}"


@schemathesis.check
def positive_data_within_stated_limits(
    ctx: CheckContext, response: Response, case: Case
) -> bool | None:
    """A body the spec allows is accepted, unless a 422 cites only stated limits."""
    del ctx
    meta = case.meta
    if meta is None or not meta.generation.mode.is_positive:
        return None
    if not 400 <= response.status_code < 500:
        return None  # 5xx: not_a_server_error's finding
    reason = unexplained_rejection(response.status_code, response.text)
    if reason is not None:
        raise AssertionError(f"Valid data should have been accepted: {reason}")
    return None
