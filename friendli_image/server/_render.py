"""Deterministic procedural pictures: landscapes for generation, prompt-driven filters for edits.

Everything here is CPU work run in a worker thread. Randomness comes only from a
``random.Random`` seeded with a sha256 of the request, so the same request gives the
same bytes on every run.
"""

from __future__ import annotations

import colorsys
import hashlib
import io
import itertools
import random
from collections.abc import Sequence

from PIL import Image, ImageChops, ImageDraw, ImageEnhance, ImageFilter, ImageOps

Color = tuple[int, int, int]

MAX_INPUT_PIXELS = 40_000_000

_COLOR_WORDS: dict[str, Color] = {
    "red": (210, 40, 40),
    "orange": (240, 140, 30),
    "yellow": (240, 210, 50),
    "gold": (220, 170, 60),
    "green": (50, 170, 70),
    "blue": (40, 90, 220),
    "purple": (140, 60, 190),
    "pink": (240, 120, 170),
    "white": (245, 245, 245),
    "black": (20, 20, 25),
}


class ImageDecodeError(ValueError):
    """The input bytes are not an image Pillow can decode (or it is too large)."""


def request_digest(prompt: str, seed: int | None, steps: int, guidance: float) -> bytes:
    """Hash what determines a picture; the prompt keeps lone surrogates instead of failing."""
    material = "\x1f".join(
        (prompt, "none" if seed is None else str(seed), str(steps), repr(float(guidance)))
    )
    return hashlib.sha256(material.encode("utf-8", "surrogatepass")).digest()


def _rng(digest: bytes, salt: bytes = b"") -> random.Random:
    seed = int.from_bytes(hashlib.sha256(digest + salt).digest()[:8], "big")
    return random.Random(seed)  # noqa: S311 -- reproducible pictures, not secrets


def _has(prompt: str, *words: str) -> bool:
    return any(word in prompt for word in words)


def _hsv(h: float, s: float, v: float) -> Color:
    r, g, b = colorsys.hsv_to_rgb(h % 1.0, max(0.0, min(1.0, s)), max(0.0, min(1.0, v)))
    return (round(r * 255), round(g * 255), round(b * 255))


def _mix(a: Color, b: Color, t: float) -> Color:
    return (
        round(a[0] + (b[0] - a[0]) * t),
        round(a[1] + (b[1] - a[1]) * t),
        round(a[2] + (b[2] - a[2]) * t),
    )


def _vertical_gradient(size: tuple[int, int], top: Color, bottom: Color) -> Image.Image:
    mask = Image.linear_gradient("L").resize(size)
    return Image.composite(Image.new("RGB", size, bottom), Image.new("RGB", size, top), mask)


def _ridge(
    rng: random.Random, size: int, base_y: float, roughness: float, depth: int
) -> list[float]:
    """Midpoint displacement: ``2**depth + 1`` heights across the width."""
    points = [base_y + rng.uniform(-1, 1) * roughness, base_y + rng.uniform(-1, 1) * roughness]
    spread = roughness
    for _ in range(depth):
        refined: list[float] = []
        for left, right in itertools.pairwise(points):
            refined.extend((left, (left + right) / 2 + rng.uniform(-1, 1) * spread))
        refined.append(points[-1])
        points = refined
        spread *= 0.55
    return [min(max(y, size * 0.08), size * 1.0) for y in points]


def _ridge_polygon(heights: Sequence[float], size: int) -> list[tuple[float, float]]:
    step = size / (len(heights) - 1)
    return [(i * step, y) for i, y in enumerate(heights)] + [(size, size), (0, size)]


def _draw_lighthouse(
    img: Image.Image, rng: random.Random, size: int, horizon: float, mood: str
) -> None:
    """A striped tower on the shore, its lamp lit (with a beam) unless it is broad day."""
    draw = ImageDraw.Draw(img)
    base_x = size * rng.choice((rng.uniform(0.12, 0.3), rng.uniform(0.7, 0.88)))
    base_y = horizon + size * 0.06
    height, half_base, half_top = size * 0.36, size * 0.045, size * 0.028
    top_y = base_y - height
    draw.polygon(
        (
            (base_x - half_base * 2.2, base_y + size * 0.08),
            (base_x - half_base * 1.6, base_y),
            (base_x + half_base * 1.6, base_y),
            (base_x + half_base * 2.2, base_y + size * 0.08),
        ),
        fill=(70, 60, 55),
    )
    bands = 5
    for band in range(bands):
        t0, t1 = band / bands, (band + 1) / bands
        y0, y1 = base_y - height * t0, base_y - height * t1
        w0 = half_base + (half_top - half_base) * t0
        w1 = half_base + (half_top - half_base) * t1
        color = (200, 40, 40) if band % 2 else (240, 240, 235)
        draw.polygon(
            ((base_x - w0, y0), (base_x - w1, y1), (base_x + w1, y1), (base_x + w0, y0)), fill=color
        )
    lamp = (255, 230, 140) if mood != "day" else (200, 220, 230)
    draw.rectangle((base_x - half_top, top_y - size * 0.035, base_x + half_top, top_y), fill=lamp)
    draw.polygon(
        (
            (base_x - half_top * 1.3, top_y - size * 0.035),
            (base_x, top_y - size * 0.07),
            (base_x + half_top * 1.3, top_y - size * 0.035),
        ),
        fill=(40, 40, 45),
    )
    if mood != "day":
        beam = Image.new("L", img.size, 0)
        direction = 1 if base_x < size / 2 else -1
        lamp_y = top_y - size * 0.018
        ImageDraw.Draw(beam).polygon(
            (
                (base_x, lamp_y),
                (base_x + direction * size * 0.7, lamp_y - size * 0.12),
                (base_x + direction * size * 0.7, lamp_y + size * 0.06),
            ),
            fill=70,
        )
        beam = beam.filter(ImageFilter.GaussianBlur(size / 100))
        img.paste(Image.composite(Image.new("RGB", img.size, lamp), img, beam))


def render_landscape(
    prompt: str, seed: int | None, steps: int, guidance: float, size: int
) -> Image.Image:
    """Paint a landscape whose palette, layout and details follow from the request."""
    digest = request_digest(prompt, seed, steps, guidance)
    rng = _rng(digest)
    text = prompt.lower()
    detail = max(0.0, min(1.0, steps / 30))

    if _has(text, "night", "moon", "star", "midnight", "dark"):
        mood = "night"
    elif _has(text, "sunset", "dusk", "dawn", "sunrise", "evening", "golden hour"):
        mood = "dusk"
    elif _has(text, "day", "noon", "sunny", "bright"):
        mood = "day"
    else:
        mood = rng.choice(("day", "day", "dusk", "night"))
    snowy = _has(text, "snow", "winter", "ice", "frozen", "alps")
    watery = _has(text, "ocean", "sea", "lake", "beach", "river", "water", "harbor", "bay")
    watery = watery or (not _has(text, "desert", "city") and rng.random() < 0.35)
    city = _has(text, "city", "skyline", "building", "town", "street", "tower")
    forest = _has(text, "forest", "tree", "wood", "park", "pine", "jungle") or rng.random() < 0.5

    hue = rng.random()
    if mood == "night":
        sky_top, sky_bottom = _hsv(0.62 + hue * 0.08, 0.8, 0.12), _hsv(0.6 + hue * 0.1, 0.6, 0.35)
    elif mood == "dusk":
        sky_top = _hsv(0.7 + hue * 0.1, 0.55, 0.45)
        sky_bottom = _hsv(0.02 + hue * 0.09, 0.75, 0.98)
    else:
        sky_top, sky_bottom = _hsv(0.55 + hue * 0.08, 0.65, 0.85), _hsv(0.52 + hue * 0.1, 0.2, 1.0)

    horizon = size * rng.uniform(0.55, 0.68)
    img = _vertical_gradient((size, size), sky_top, sky_bottom)

    if mood == "night":
        draw = ImageDraw.Draw(img)
        for _ in range(int(40 + 160 * detail)):
            x, y = rng.uniform(0, size), rng.uniform(0, horizon)
            r = rng.choice((0.5, 0.8, 1.2)) * size / 512
            shade = rng.randint(180, 255)
            draw.ellipse((x - r, y - r, x + r, y + r), fill=(shade, shade, min(255, shade + 20)))

    # Sun or moon with a soft glow.
    body_x = size * rng.uniform(0.18, 0.82)
    body_y = horizon * (rng.uniform(0.25, 0.55) if mood != "dusk" else rng.uniform(0.6, 0.85))
    radius = size * rng.uniform(0.05, 0.09)
    body_color: Color = (
        (245, 243, 225) if mood == "night" else (255, 245, 200) if mood == "day" else (255, 190, 90)
    )
    glow = Image.new("L", (size, size), 0)
    ImageDraw.Draw(glow).ellipse(
        (
            body_x - radius * 2.4,
            body_y - radius * 2.4,
            body_x + radius * 2.4,
            body_y + radius * 2.4,
        ),
        fill=110 if mood != "night" else 70,
    )
    glow = glow.filter(ImageFilter.GaussianBlur(radius * 0.9))
    img = Image.composite(Image.new("RGB", (size, size), body_color), img, glow)
    draw = ImageDraw.Draw(img)
    draw.ellipse(
        (body_x - radius, body_y - radius, body_x + radius, body_y + radius), fill=body_color
    )
    if mood == "night":
        for _ in range(3):
            cx = body_x + rng.uniform(-0.5, 0.5) * radius
            cy = body_y + rng.uniform(-0.5, 0.5) * radius
            cr = radius * rng.uniform(0.1, 0.22)
            draw.ellipse((cx - cr, cy - cr, cx + cr, cy + cr), fill=(220, 218, 205))

    # Clouds: clusters of translucent ellipses.
    clouds = Image.new("L", (size, size), 0)
    cloud_draw = ImageDraw.Draw(clouds)
    for _ in range(rng.randint(1, 4)):
        cx, cy = rng.uniform(0, size), rng.uniform(size * 0.08, horizon * 0.7)
        for _ in range(rng.randint(4, 8)):
            w = size * rng.uniform(0.05, 0.12)
            h = w * rng.uniform(0.4, 0.65)
            ox, oy = rng.uniform(-2.2, 2.2) * w, rng.uniform(-0.4, 0.3) * h
            cloud_draw.ellipse((cx + ox - w, cy + oy - h, cx + ox + w, cy + oy + h), fill=150)
    clouds = clouds.filter(ImageFilter.GaussianBlur(size / 160))
    cloud_color = (235, 235, 245) if mood == "day" else _mix(sky_bottom, (255, 255, 255), 0.4)
    if mood == "night":
        cloud_color = _mix(sky_top, (120, 120, 150), 0.5)
    img = Image.composite(Image.new("RGB", (size, size), cloud_color), img, clouds)

    # Mountain ranges, far to near, fading into the horizon colour.
    draw = ImageDraw.Draw(img)
    layers = 2 + round(2 * detail)
    depth = 3 + round(5 * detail)
    land_hue = rng.choice((0.08, 0.25, 0.3, 0.62, 0.75))
    near = _hsv(land_hue, 0.55, 0.28 if mood != "night" else 0.12)
    for layer in range(layers):
        t = layer / max(1, layers - 1)
        base = horizon - size * (0.22 - 0.16 * t)
        heights = _ridge(rng, size, base, size * (0.16 - 0.07 * t), depth)
        color = _mix(_mix(sky_bottom, sky_top, 0.3), near, 0.35 + 0.65 * t)
        draw.polygon(_ridge_polygon(heights, size), fill=color)
        if snowy and layer < max(1, layers - 1):
            # White ridge first, then the rock drawn lower where the peaks rise above the
            # snow line, leaving caps that taper off as the ridge descends.
            snow_line = min(heights) + size * 0.09
            band = size * 0.05
            rock = [y + band * max(0.0, min(1.0, (snow_line - y) / band)) for y in heights]
            draw.polygon(_ridge_polygon(heights, size), fill=_mix((250, 250, 255), color, 0.1))
            draw.polygon(_ridge_polygon(rock, size), fill=color)

    if city:
        x = rng.uniform(-size * 0.05, size * 0.1)
        skyline = _mix(near, (10, 10, 20), 0.5)
        while x < size:
            width = size * rng.uniform(0.04, 0.09)
            height = size * rng.uniform(0.06, 0.3)
            draw.rectangle((x, horizon - height, x + width, horizon + 2), fill=skyline)
            window = (255, 215, 110) if mood != "day" else _mix(skyline, (200, 210, 230), 0.35)
            for wy in range(int(horizon - height + 4), int(horizon - 4), max(4, size // 64)):
                for wx in range(int(x + 3), int(x + width - 3), max(4, size // 64)):
                    if rng.random() < 0.25 + 0.35 * detail:
                        draw.rectangle((wx, wy, wx + size / 200, wy + size / 200), fill=window)
            x += width + size * rng.uniform(0.0, 0.02)

    if watery:
        water_top = round(horizon)
        reflection = img.crop((0, max(0, 2 * water_top - size), size, water_top))
        reflection = ImageOps.flip(reflection).resize((size, size - water_top))
        water_color = _mix(sky_top, (10, 40, 70), 0.5)
        water = Image.blend(reflection, Image.new("RGB", reflection.size, water_color), 0.45)
        water_draw = ImageDraw.Draw(water)
        for _ in range(int(20 + 80 * detail)):
            ly = rng.uniform(0, water.height)
            lx = rng.uniform(0, size)
            length = size * rng.uniform(0.02, 0.12)
            glint = _mix(water_color, body_color, rng.uniform(0.2, 0.7))
            water_draw.line((lx, ly, lx + length, ly), fill=glint, width=max(1, size // 400))
        img.paste(water, (0, water_top))
        draw = ImageDraw.Draw(img)
    else:
        ground = _ridge(rng, size, horizon + size * 0.12, size * 0.04, depth)
        draw.polygon(_ridge_polygon(ground, size), fill=_mix(near, (0, 0, 0), 0.3))

    if "lighthouse" in text:
        _draw_lighthouse(img, rng, size, horizon, mood)
        draw = ImageDraw.Draw(img)

    if forest:
        tree_color = _mix(_hsv(0.33, 0.6, 0.3), near, 0.4)
        if mood == "night":
            tree_color = _mix(tree_color, (0, 0, 10), 0.6)
        if snowy:
            tree_color = _mix(tree_color, (200, 210, 220), 0.2)
        # On a lake the trees line the far shore; on land they fill the foreground.
        scale, low, high = (
            (0.3, horizon / size, horizon / size + 0.01) if watery else (1.0, 0.86, 1.02)
        )
        for _ in range(int(6 + 30 * detail)):
            tx = rng.uniform(0, size)
            ty = size * rng.uniform(low, high)
            th = size * rng.uniform(0.08, 0.2) * scale
            tw = th * rng.uniform(0.28, 0.4)
            draw.polygon(((tx, ty - th), (tx - tw, ty), (tx + tw, ty)), fill=tree_color)

    if guidance:
        img = ImageEnhance.Color(img).enhance(1.0 + min(guidance, 20.0) / 25)
        img = ImageEnhance.Contrast(img).enhance(1.0 + min(guidance, 20.0) / 60)
    if steps < 6:
        # Few denoising steps: the picture stays soft, as a real sampler would leave it.
        img = img.filter(ImageFilter.GaussianBlur(size / 512 * (6 - steps) * 1.6))
    return img


def _check_pixels(img: Image.Image) -> None:
    width, height = img.size
    if width * height > MAX_INPUT_PIXELS:
        raise ImageDecodeError(f"image of {width}x{height} pixels is too large")


def decode_image(data: bytes) -> Image.Image:
    """Decode image bytes to RGB, raising `ImageDecodeError` for anything else."""
    if not data:
        raise ImageDecodeError("image is empty")
    try:
        with Image.open(io.BytesIO(data)) as opened:
            _check_pixels(opened)
            opened.load()
            rgb: Image.Image = opened.convert("RGB")
    except ImageDecodeError:
        raise
    except Exception as exc:  # Pillow raises many exception types for hostile bytes
        raise ImageDecodeError("not a decodable image") from exc
    return rgb


def apply_control(
    img: Image.Image, controls: Sequence[Image.Image], weights: Sequence[float]
) -> Image.Image:
    """Blend each control image's edges and colours into ``img``, scaled by its weight."""
    size = img.size
    for control, weight in zip(controls, weights, strict=True):
        if weight <= 0:
            continue
        fitted = ImageOps.fit(control, size)
        img = Image.blend(img, fitted, 0.3 * weight)
        edges = ImageOps.grayscale(fitted).filter(ImageFilter.FIND_EDGES)
        gain = 1.6 * weight
        edges = ImageOps.autocontrast(edges).point(lambda v, gain=gain: min(255, int(v * gain)))
        img = Image.composite(Image.new("RGB", size, (25, 20, 30)), img, edges)
    return img


def edit_image(
    prompt: str,
    seed: int | None,
    steps: int,
    guidance: float,
    *,
    inputs: Sequence[Image.Image],
    size: int,
) -> Image.Image:
    """Transform the input image(s) as the prompt suggests: tints, weather, time of day."""
    digest = request_digest(prompt, seed, steps, guidance)
    rng = _rng(digest, b"edit")
    text = prompt.lower()
    strength = 0.4 + 0.6 * min(1.0, steps / 30)

    img = ImageOps.fit(inputs[0], (size, size))
    for extra in inputs[1:]:
        img = Image.blend(img, ImageOps.fit(extra, (size, size)), 0.35)

    tint = next((c for word, c in _COLOR_WORDS.items() if word in text), None)
    if tint is None:
        tint = _hsv(rng.random(), 0.6, 0.9)
    img = Image.blend(img, Image.new("RGB", img.size, tint), 0.12 + 0.1 * strength)

    if _has(text, "black and white", "grayscale", "greyscale", "monochrome"):
        img = ImageOps.grayscale(img).convert("RGB")
    if _has(text, "sepia", "vintage", "old photo", "retro"):
        img = ImageOps.colorize(ImageOps.grayscale(img), (40, 26, 13), (255, 235, 200))
    if _has(text, "sketch", "drawing", "pencil", "outline"):
        img = ImageOps.invert(ImageOps.grayscale(img).filter(ImageFilter.FIND_EDGES)).convert("RGB")
    if _has(text, "night", "dark", "moon"):
        img = ImageEnhance.Brightness(img).enhance(1.0 - 0.55 * strength)
        img = Image.blend(img, Image.new("RGB", img.size, (10, 20, 70)), 0.25)
    if _has(text, "sunset", "warm", "golden", "dusk"):
        img = Image.blend(img, Image.new("RGB", img.size, (255, 140, 40)), 0.2 * strength)
    if _has(text, "bright", "sunny", "day"):
        img = ImageEnhance.Brightness(img).enhance(1.0 + 0.3 * strength)
    if _has(text, "blur", "dream", "soft", "fog", "mist"):
        img = img.filter(ImageFilter.GaussianBlur(size / 128 * strength))
    if _has(text, "snow", "winter", "blizzard"):
        img = Image.blend(img, Image.new("RGB", img.size, (225, 235, 250)), 0.18)
        flakes = Image.new("L", img.size, 0)
        flake_draw = ImageDraw.Draw(flakes)
        for _ in range(int(size * size / 900 * strength)):
            x, y = rng.uniform(0, size), rng.uniform(0, size)
            r = rng.uniform(0.6, 2.4) * size / 512
            flake_draw.ellipse((x - r, y - r, x + r, y + r), fill=rng.randint(170, 255))
        img = Image.composite(Image.new("RGB", img.size, (255, 255, 255)), img, flakes)

    # A soft vignette positioned by the prompt hash, so every prompt leaves its own mark.
    vignette = Image.new("L", img.size, 0)
    cx, cy = size * rng.uniform(0.35, 0.65), size * rng.uniform(0.35, 0.65)
    reach = size * rng.uniform(0.55, 0.75)
    ImageDraw.Draw(vignette).ellipse((cx - reach, cy - reach, cx + reach, cy + reach), fill=255)
    vignette = ImageChops.invert(vignette.filter(ImageFilter.GaussianBlur(size / 10)))
    vignette = vignette.point(lambda v: int(v * 0.55))
    img = Image.composite(Image.new("RGB", img.size, (0, 0, 0)), img, vignette)
    if guidance:
        img = ImageEnhance.Contrast(img).enhance(1.0 + min(guidance, 20.0) / 50)
    return img


def encode_image(img: Image.Image, image_format: str) -> bytes:
    """Encode as JPEG or PNG with fixed settings, so equal pictures give equal bytes."""
    buffer = io.BytesIO()
    if image_format == "png":
        img.save(buffer, format="PNG", compress_level=6)
    else:
        img.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()
