"""Generated LLaVA data for the demo, tests and benchmarks (no downloads possible here).

Each image is a flat light-grey canvas of a realistic size and aspect ratio with one coloured
shape in the left / centre / right third. The text is fully determined by the image, so even a
tiny model's loss falls quickly:

- captions ("plain"-style, also valid chat records): "A red circle on the left."
- VQA chat turns: "What colour is the circle?" -> "Red." (and shape / position questions)
- text-only records: "Repeat the word: apple" -> "apple"

:func:`make_synthetic_dataset` writes images + a record file and is deterministic for a seed.
:func:`write_bad_examples` writes one record per kind of bad input (and per image mode that must
be converted, not skipped), with the skip reason each should get.
"""

from __future__ import annotations

import dataclasses
import io
import os
import random
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from manager_jax.data.records import write_records

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "purple": (140, 60, 180),
    "orange": (240, 140, 30),
}
SHAPES = ("square", "circle", "triangle")
POSITIONS = ("left", "centre", "right")
BACKGROUND = (200, 200, 200)
# Photo-like sizes (W, H): landscape, portrait, square, small and large.
DEFAULT_SIZES: tuple[tuple[int, int], ...] = (
    (640, 480), (480, 640), (800, 600), (1024, 768), (500, 375), (384, 384),
    (1280, 720), (720, 1280), (1600, 1200), (300, 200), (1024, 1024), (2000, 1500),
)
WORDS = ("apple", "river", "stone", "cloud", "lamp", "tiger", "paper", "glass", "honey", "piano")
KINDS = ("caption", "vqa", "text")


@dataclasses.dataclass(frozen=True)
class Scene:
    """What a generated image shows."""

    width: int
    height: int
    colour: str
    shape: str
    position: str


def draw_scene(scene: Scene) -> Image.Image:
    """Render a scene: one filled shape, side 40% of the shorter image side, vertically centred."""
    img = Image.new("RGB", (scene.width, scene.height), BACKGROUND)
    draw = ImageDraw.Draw(img)
    side = max(4, int(0.4 * min(scene.width, scene.height)))
    cx = int(scene.width * {"left": 1 / 6, "centre": 1 / 2, "right": 5 / 6}[scene.position])
    cy = scene.height // 2
    half = side // 2
    box = (cx - half, cy - half, cx + half, cy + half)
    fill = COLOURS[scene.colour]
    if scene.shape == "square":
        draw.rectangle(box, fill=fill)
    elif scene.shape == "circle":
        draw.ellipse(box, fill=fill)
    else:
        draw.polygon([(cx, cy - half), (cx - half, cy + half), (cx + half, cy + half)], fill=fill)
    return img


def caption(scene: Scene) -> str:
    where = "in the centre" if scene.position == "centre" else f"on the {scene.position}"
    return f"A {scene.colour} {scene.shape} {where}."


def vqa_turns(scene: Scene, rng: random.Random) -> list[tuple[str, str]]:
    """One or two (question, answer) pairs about the scene."""
    where = "In the centre." if scene.position == "centre" else f"On the {scene.position}."
    pool = [
        (f"What colour is the {scene.shape}?", f"{scene.colour.capitalize()}."),
        ("What shape is shown?", f"A {scene.shape}."),
        (f"Where is the {scene.shape}?", where),
    ]
    rng.shuffle(pool)
    return pool[: rng.choice((1, 2))]


def random_scene(rng: random.Random, sizes: Sequence[tuple[int, int]]) -> Scene:
    w, h = sizes[rng.randrange(len(sizes))]
    return Scene(w, h, rng.choice(sorted(COLOURS)), rng.choice(SHAPES), rng.choice(POSITIONS))


def _turn(role: str, value: str) -> dict[str, str]:
    return {"from": role, "value": value}


@dataclasses.dataclass
class SyntheticDataset:
    records_path: str
    image_folder: str
    records: list[dict[str, Any]]


def make_synthetic_dataset(
    out_dir: str,
    *,
    num_records: int = 64,
    seed: int = 0,
    kinds: Sequence[str] = KINDS,
    weights: Sequence[float] | None = None,
    sizes: Sequence[tuple[int, int]] = DEFAULT_SIZES,
    image_format: str = "jpeg",
    records_file: str = "records.json",
    multi_image_fraction: float = 0.0,
) -> SyntheticDataset:
    """Write ``num_records`` records (+ images under ``out_dir/images``) and return them.

    kinds: any of "caption", "vqa", "text"; weights: their relative frequencies (default 4:4:1
    over the kinds given). multi_image_fraction: share of VQA records with two images ("Which
    image shows a red shape, the first or the second?"). Same seed, same files.
    """
    unknown = set(kinds) - set(KINDS)
    if unknown or not kinds:
        raise ValueError(f"kinds must be a non-empty subset of {KINDS}, got {kinds}")
    default_weight = {"caption": 4.0, "vqa": 4.0, "text": 1.0}
    weights = list(weights) if weights is not None else [default_weight[k] for k in kinds]
    rng = random.Random(seed)
    image_dir = os.path.join(out_dir, "images")
    os.makedirs(image_dir, exist_ok=True)
    ext = {"jpeg": "jpg", "png": "png"}[image_format]

    def save(scene: Scene, name: str) -> str:
        path = os.path.join(image_dir, name)
        img = draw_scene(scene)
        if image_format == "jpeg":
            img.save(path, format="JPEG", quality=90)
        else:
            img.save(path, format="PNG")
        return f"images/{name}"

    records = []
    for i in range(num_records):
        kind = rng.choices(list(kinds), weights=weights)[0]
        rid = f"syn-{i:06d}"
        if kind == "text":
            word = rng.choice(WORDS)
            records.append({"id": rid, "conversations": [_turn("human", f"Repeat the word: {word}"), _turn("gpt", word)]})
            continue
        scene = random_scene(rng, sizes)
        if kind == "caption":
            image = save(scene, f"{i:06d}.{ext}")
            records.append({
                "id": rid, "image": image,
                "conversations": [_turn("human", "<image>\nDescribe the image briefly."), _turn("gpt", caption(scene))],
            })
            continue
        if rng.random() < multi_image_fraction:
            other = random_scene(rng, sizes)
            while other.colour == scene.colour:
                other = random_scene(rng, sizes)
            first = rng.random() < 0.5
            images = [save(scene, f"{i:06d}_a.{ext}"), save(other, f"{i:06d}_b.{ext}")]
            target = scene.colour if first else other.colour
            answer = "The first." if first else "The second."
            records.append({
                "id": rid, "image": images,
                "conversations": [
                    _turn("human", f"<image> <image>\nWhich image shows a {target} shape, the first or the second?"),
                    _turn("gpt", answer),
                ],
            })
            continue
        image = save(scene, f"{i:06d}.{ext}")
        turns = []
        for j, (question, answer) in enumerate(vqa_turns(scene, rng)):
            turns += [_turn("human", ("<image>\n" if j == 0 else "") + question), _turn("gpt", answer)]
        records.append({"id": rid, "image": image, "conversations": turns})

    records_path = os.path.join(out_dir, records_file)
    write_records(records_path, records)
    return SyntheticDataset(records_path=records_path, image_folder=out_dir, records=records)


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def write_bad_examples(out_dir: str, *, seed: int = 0) -> list[tuple[dict[str, Any], str | None]]:
    """Write one record per bad-input case; returns (record, expected skip reason or None).

    None marks images in unusual modes (CMYK, palette, RGBA, LA, 16-bit grey, greyscale) that
    must be converted to RGB and kept. Image paths are relative to ``out_dir``.
    """
    rng = random.Random(seed)
    image_dir = os.path.join(out_dir, "bad_images")
    os.makedirs(image_dir, exist_ok=True)
    base = draw_scene(Scene(320, 240, "red", "circle", "left"))
    jpeg = io.BytesIO()
    base.save(jpeg, format="JPEG", quality=90)
    jpeg_bytes = jpeg.getvalue()

    files: dict[str, bytes] = {
        "truncated.jpg": jpeg_bytes[: len(jpeg_bytes) // 2],
        "empty.jpg": b"",
        "not_an_image.jpg": b"this is plain text, not an image\n" * 4,
        "ok.jpg": jpeg_bytes,
    }
    cmyk = io.BytesIO()
    base.convert("CMYK").save(cmyk, format="JPEG", quality=90)
    files["cmyk.jpg"] = cmyk.getvalue()
    files["palette.png"] = _png_bytes(base.convert("P", palette=Image.Palette.ADAPTIVE, colors=16))
    rgba = base.convert("RGBA")
    rgba.putalpha(128)
    files["rgba.png"] = _png_bytes(rgba)
    files["la.png"] = _png_bytes(base.convert("LA"))
    files["grey.png"] = _png_bytes(base.convert("L"))
    grey16 = (np.asarray(base.convert("L"), np.uint16) * 257).astype(np.uint16)
    files["grey16.png"] = _png_bytes(Image.fromarray(grey16))
    for name, data in files.items():
        with open(os.path.join(image_dir, name), "wb") as f:
            f.write(data)

    def rec(rid: str, image: Any, turns: list[dict[str, str]] | None) -> dict[str, Any]:
        r: dict[str, Any] = {"id": rid}
        if image is not None:
            r["image"] = image
        if turns is not None:
            r["conversations"] = turns
        return r

    ask = [_turn("human", "<image>\nWhat colour is the circle?"), _turn("gpt", "Red.")]
    cases: list[tuple[dict[str, Any], str | None]] = [
        (rec("bad-missing", "bad_images/does_not_exist.jpg", ask), "missing_image"),
        (rec("bad-truncated", "bad_images/truncated.jpg", ask), "truncated_image"),
        (rec("bad-empty-file", "bad_images/empty.jpg", ask), "zero_size_image"),
        (rec("bad-not-image", "bad_images/not_an_image.jpg", ask), "unreadable_image"),
        (rec("bad-no-conversations", "bad_images/ok.jpg", None), "no_conversations"),
        (rec("bad-empty-conversations", "bad_images/ok.jpg", []), "no_conversations"),
        (rec("bad-no-answer", "bad_images/ok.jpg", [ask[0], _turn("human", "And?")]), "no_assistant_turn"),
        (rec("bad-count-extra", "bad_images/ok.jpg", [_turn("human", "<image> <image>\nSame?"), ask[1]]), "image_count_mismatch"),
        (rec("bad-count-missing", ["bad_images/ok.jpg"] * 2, [_turn("human", "What colour?"), ask[1]]), "image_count_mismatch"),
        (rec("bad-empty-image-list", [], ask), "image_count_mismatch"),
        # As in the original: one image and no "<image>" trains as text (the image is checked, not
        # inserted); a text-only record's "<image>" is plain text.
        (rec("ok-image-without-tag", "bad_images/ok.jpg", [_turn("human", "What colour?"), ask[1]]), None),
        (rec("ok-text-with-image-tag", None, ask), None),
    ]
    for name in ("cmyk.jpg", "palette.png", "rgba.png", "la.png", "grey.png", "grey16.png"):
        cases.append((rec(f"ok-{name.split('.')[0]}", f"bad_images/{name}", ask), None))
    rng.shuffle(cases)
    return cases
