"""Synthetic data: deterministic, realistic sizes, and the text really describes the image."""

import os
import re

import numpy as np
from PIL import Image

from manager_jax.data.synthetic import BACKGROUND, COLOURS, DEFAULT_SIZES, make_synthetic_dataset

POS_X = {"left": 1 / 6, "centre": 1 / 2, "right": 5 / 6}


def _files(root):
    out = {}
    for name in sorted(os.listdir(os.path.join(root, "images"))):
        with open(os.path.join(root, "images", name), "rb") as f:
            out[name] = f.read()
    return out


def test_same_seed_same_files_other_seed_other_files(tmp_path):
    a = make_synthetic_dataset(str(tmp_path / "a"), num_records=12, seed=3)
    b = make_synthetic_dataset(str(tmp_path / "b"), num_records=12, seed=3)
    c = make_synthetic_dataset(str(tmp_path / "c"), num_records=12, seed=4)
    assert a.records == b.records and _files(tmp_path / "a") == _files(tmp_path / "b")
    assert a.records != c.records


def _colour_at(img, x, y):
    return np.asarray(img.convert("RGB"))[y, x].astype(int)


def _closest_colour(rgb):
    return min(COLOURS, key=lambda name: np.abs(np.array(COLOURS[name]) - rgb).sum())


def test_captions_and_answers_describe_the_image(tmp_path):
    ds = make_synthetic_dataset(str(tmp_path), num_records=40, seed=1, multi_image_fraction=0.3)
    kinds = {"caption": 0, "vqa": 0, "text": 0, "multi": 0}
    for rec in ds.records:
        turns = rec["conversations"]
        if "image" not in rec:
            kinds["text"] += 1
            word = turns[0]["value"].split(": ")[1]
            assert turns[1]["value"] == word
            continue
        if isinstance(rec["image"], list):
            kinds["multi"] += 1
            target = re.search(r"shows a (\w+) shape", turns[0]["value"]).group(1)
            colours = []
            for name in rec["image"]:
                img = Image.open(os.path.join(ds.image_folder, name))
                w, h = img.size
                centres = [_colour_at(img, int(w * f), h // 2) for f in POS_X.values()]
                shape_rgb = max(centres, key=lambda c: np.abs(c - np.array(BACKGROUND)).sum())
                colours.append(_closest_colour(shape_rgb))
            assert turns[1]["value"] == ("The first." if colours[0] == target else "The second.")
            assert colours.count(target) == 1
            continue
        img = Image.open(os.path.join(ds.image_folder, rec["image"]))
        assert img.size in DEFAULT_SIZES
        w, h = img.size
        assert np.abs(_colour_at(img, 2, 2) - np.array(BACKGROUND)).max() <= 8
        text = turns[1]["value"]
        if turns[0]["value"].endswith("Describe the image briefly."):
            kinds["caption"] += 1
            m = re.fullmatch(r"A (\w+) (\w+) (?:on the (\w+)|in the (centre))\.", text)
            colour, position = m.group(1), m.group(3) or m.group(4)
        else:
            kinds["vqa"] += 1
            q = turns[0]["value"]
            if "What colour" not in q:
                continue
            colour = text.rstrip(".").lower()
            position = None
        xs = [POS_X[position]] if position else list(POS_X.values())
        seen = [_closest_colour(_colour_at(img, int(w * f), h // 2)) for f in xs]
        assert colour in seen, (rec["id"], text, seen)
    assert all(kinds[k] > 0 for k in kinds), kinds


def test_sizes_and_kinds_can_be_chosen(tmp_path):
    ds = make_synthetic_dataset(str(tmp_path), num_records=10, seed=0, kinds=("caption",), sizes=[(123, 77)],
                                image_format="png", records_file="r.jsonl")
    assert ds.records_path.endswith("r.jsonl") and os.path.isfile(ds.records_path)
    assert all(r["image"].endswith(".png") for r in ds.records)
    sizes = set()
    for r in ds.records:
        with Image.open(os.path.join(ds.image_folder, r["image"])) as image:
            sizes.add(image.size)
    assert sizes == {(123, 77)}
