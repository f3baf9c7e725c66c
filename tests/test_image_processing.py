"""Tests for manager_jax.data.image_processing: RGB conversion, crops and normalisation.

References: the original crop algorithm (SPEC §3.5) rewritten here with PIL, transformers'
LlavaOnevisionImageProcessorPil (mean/std 0.5), and hand-computed pixel values.
"""

import math

import numpy as np
import pytest
from PIL import Image
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil

from manager_jax import multigrid as mg
from manager_jax.data import image_processing as ip
from manager_jax.pixels import normalize

PINPOINTS = "(1x1),...,(6x6)"


def random_image(width, height, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def spec_crops(image):
    """SPEC §3.5 with plain PIL: best canvas, ceil resize, black canvas, row-major tiles, base."""
    W, H = image.size
    best, best_eff, best_waste = None, 0, math.inf
    for w, h in [(384 * i, 384 * j) for i in range(1, 7) for j in range(1, 7)]:
        s = min(w / W, h / H)
        eff = min(int(W * s) * int(H * s), W * H)
        if eff > best_eff or (eff == best_eff and w * h - eff < best_waste):
            best, best_eff, best_waste = (w, h), eff, w * h - eff
    tw, th = best
    if tw / W < th / H:
        nw, nh = tw, min(math.ceil(H * tw / W), th)
    else:
        nw, nh = min(math.ceil(W * th / H), tw), th
    canvas = Image.new("RGB", (tw, th), (0, 0, 0))
    canvas.paste(image.resize((nw, nh)), ((tw - nw) // 2, (th - nh) // 2))
    tiles = [canvas.crop((x, y, x + 384, y + 384)) for y in range(0, th, 384) for x in range(0, tw, 384)]
    return [image.resize((384, 384))] + tiles


@pytest.fixture(scope="module")
def hf_image_processor():
    return LlavaOnevisionImageProcessorPil(image_mean=[0.5] * 3, image_std=[0.5] * 3)


# ------------------------------------------------------------------------------------------
# Crops
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(640, 480), (1920, 1080), (50, 700), (1, 1), (4000, 3), (3, 900), (385, 383)])
def test_anyres_crops_equal_spec_algorithm(size):
    image = random_image(*size, seed=1)
    ours = ip.image_crops(image, mode="anyres_max_9", pinpoints=PINPOINTS)
    ref = spec_crops(image)
    assert len(ours) == len(ref) == mg.plan_image(size, mode="anyres_max_9", pinpoints=PINPOINTS).num_crops
    for a, b in zip(ours, ref):
        assert a.size == (384, 384)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_anyres_tiles_are_row_major_with_centred_black_padding():
    # 768x300 -> canvas 768x384 (2 tiles across): resized image 768x300, pasted at y = 42.
    image = Image.new("RGB", (768, 300), (200, 10, 10))
    base, left, right = ip.image_crops(image, mode="anyres", pinpoints=PINPOINTS)
    for tile in (left, right):
        arr = np.asarray(tile)
        assert (arr[:42] == 0).all() and (arr[342:] == 0).all()
        assert (arr[42:342] == (200, 10, 10)).all()
    assert (np.asarray(base) == (200, 10, 10)).all()  # the base is squashed, never padded
    # row-major order: a left/right split image gives its left half in the first tile
    two = Image.new("RGB", (768, 384), (0, 0, 255))
    two.paste((255, 0, 0), (0, 0, 384, 384))
    _, first, second = ip.image_crops(two, mode="anyres", pinpoints=PINPOINTS)
    assert (np.asarray(first) == (255, 0, 0)).all() and (np.asarray(second) == (0, 0, 255)).all()


def test_square_and_pad_crops():
    image = random_image(200, 100, seed=2)
    (square,) = ip.image_crops(image, mode="square")
    np.testing.assert_array_equal(np.asarray(square), np.asarray(image.resize((384, 384), Image.Resampling.BICUBIC)))
    padded = ip.expand_to_square(image)
    arr = np.asarray(padded)
    assert padded.size == (200, 200)
    assert (arr[:50] == 127).all() and (arr[150:] == 127).all()
    np.testing.assert_array_equal(arr[50:150], np.asarray(image))
    (pad,) = ip.image_crops(image, mode="pad")
    np.testing.assert_array_equal(np.asarray(pad), np.asarray(padded.resize((384, 384), Image.Resampling.BICUBIC)))
    tall = ip.expand_to_square(random_image(30, 101, seed=3))
    assert tall.size == (101, 101) and (np.asarray(tall)[:, :35] == 127).all()


@pytest.mark.parametrize("size", [(640, 480), (1920, 1080), (50, 700), (1000, 333)])
def test_pixels_equal_transformers_pil_processor(size, hf_image_processor):
    image = random_image(*size, seed=4)
    ref = hf_image_processor(images=[image], return_tensors="np")["pixel_values"][0].transpose(0, 2, 3, 1)
    pixels, plan = ip.preprocess_image(image, mode="anyres_max_9", pinpoints=PINPOINTS, convention="hf")
    assert pixels.shape == ref.shape == (plan.num_crops, 384, 384, 3) and pixels.dtype == np.uint8
    np.testing.assert_allclose(normalize(pixels), ref, atol=1e-6)


EDGE_SIZES = [(1, 2000), (2000, 1), (383, 385), (384, 768), (1152, 1152), (4000, 300), (1153, 384), (767, 1536), (960, 577)]


@pytest.mark.parametrize("size", EDGE_SIZES)
def test_edge_size_pixels_equal_both_references(size, hf_image_processor):
    # strips, exact pinpoint sizes, and sizes one pixel off a pinpoint or its aspect ratio
    image = random_image(*size, seed=13)
    ref = hf_image_processor(images=[image], return_tensors="np")["pixel_values"][0].transpose(0, 2, 3, 1)
    pixels, _ = ip.preprocess_image(image, mode="anyres_max_9", pinpoints=PINPOINTS, convention="hf")
    np.testing.assert_allclose(normalize(pixels), ref, atol=1e-6)
    original, _ = ip.preprocess_image(image, mode="anyres_max_9", pinpoints=PINPOINTS, convention="original")
    np.testing.assert_array_equal(original, ip.crop_pixels(spec_crops(image)))
    ref = hf_image_processor(images=[[image, image]], return_tensors="np")["pixel_values"][0, :1].transpose(0, 2, 3, 1)
    pixels, _ = ip.preprocess_image(image, mode="pad", convention="hf")
    np.testing.assert_allclose(normalize(pixels), ref, atol=1e-6)


def test_pad_pixels_equal_transformers_multi_image(hf_image_processor):
    image = random_image(500, 300, seed=5)
    ref = hf_image_processor(images=[[image, image]], return_tensors="np")["pixel_values"][0].transpose(0, 2, 3, 1)
    pixels, plan = ip.preprocess_image(image, mode="pad", convention="hf")
    assert pixels.shape == ref.shape == (1, 384, 384, 3) and plan.num_tokens == 730
    np.testing.assert_allclose(normalize(pixels), ref, atol=1e-6)


def transparent_images():
    rng = np.random.default_rng(6)
    rgba = rng.integers(0, 256, (300, 500, 4), dtype=np.uint8)
    rgba[..., 3] = np.where(rng.random((300, 500)) < 0.3, 0, rgba[..., 3])  # fully clear pixels too
    rgba = Image.fromarray(rgba, "RGBA")
    pal = rgba.convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    pal.info["transparency"] = 3  # a palette entry drawn as clear (PNG tRNS)
    rgb = rgba.convert("RGB")
    rgb.info["transparency"] = tuple(int(v) for v in np.asarray(rgb)[0, 0])  # an RGB PNG's tRNS colour
    return {"RGBA": rgba, "LA": rgba.convert("LA"), "PA": rgba.convert("PA"), "P+tRNS": pal, "RGB+tRNS": rgb}


@pytest.mark.parametrize("name", ["RGBA", "LA", "PA", "P+tRNS", "RGB+tRNS"])
def test_hf_convention_composites_transparency_on_white_as_transformers(name, hf_image_processor):
    # transformers' processor lays transparent pixels over white; the original (and "original")
    # converts with PIL, which drops the alpha channel.
    image = transparent_images()[name]
    ref = hf_image_processor(images=[image], return_tensors="np")["pixel_values"][0].transpose(0, 2, 3, 1)
    pixels, _ = ip.preprocess_image(image, mode="anyres_max_9", pinpoints=PINPOINTS, convention="hf")
    np.testing.assert_allclose(normalize(pixels), ref, atol=1e-6)
    original, _ = ip.preprocess_image(image, mode="anyres_max_9", pinpoints=PINPOINTS, convention="original")
    np.testing.assert_array_equal(original, ip.crop_pixels(spec_crops(image.convert("RGB"))))


def test_max_tiles_keeps_crops_and_plan_consistent():
    image = random_image(1920, 1080, seed=6)
    pixels, plan = ip.preprocess_image(image, mode="anyres_max_9", pinpoints=PINPOINTS, max_tiles=4)
    assert pixels.shape[0] == plan.num_crops <= 5


# ------------------------------------------------------------------------------------------
# Normalisation
# ------------------------------------------------------------------------------------------


def test_crop_pixels_values_and_layout():
    arr = np.zeros((384, 384, 3), np.uint8)
    arr[0, 0] = (0, 128, 255)
    arr[5, 7] = (1, 2, 3)
    crops = ip.crop_pixels([Image.fromarray(arr)])
    assert crops.shape == (1, 384, 384, 3) and crops.dtype == np.uint8
    np.testing.assert_array_equal(crops[0], arr)
    out = normalize(crops)
    np.testing.assert_allclose(out[0, 0, 0], np.array([0, 128, 255]) / 127.5 - 1, atol=1e-6)
    np.testing.assert_allclose(out[0, 5, 7], np.array([1, 2, 3]) / 127.5 - 1, atol=1e-6)  # NHWC, not CHW
    assert out[0, 1, 1, 0] == -1.0


def test_crop_pixels_resizes_other_sizes_bicubic():
    crop = random_image(100, 50, seed=7)
    out = ip.crop_pixels([crop, crop.resize((384, 384), Image.Resampling.BICUBIC)])
    np.testing.assert_array_equal(out[0], out[1])
    with pytest.raises(ValueError):
        ip.crop_pixels([])


def test_preprocess_image_plan_and_manager_mask():
    image = random_image(640, 480, seed=8)
    pixels, plan = ip.preprocess_image(image, mode="anyres_max_9", pinpoints=PINPOINTS, grid_type="grid")
    assert pixels.shape == (5, 384, 384, 3) and plan.num_tokens == 2929
    np.testing.assert_array_equal(plan.manager, ~plan.is_base)
    assert pixels.dtype == np.uint8
    pixels, plan = ip.preprocess_image(image, mode="square")
    assert pixels.shape == (1, 384, 384, 3) and plan.num_tokens == 729
    with pytest.raises(ValueError, match="pinpoints"):
        ip.preprocess_image(image, mode="anyres")


# ------------------------------------------------------------------------------------------
# Image modes
# ------------------------------------------------------------------------------------------


def rgb_of(image):
    out = ip.load_rgb(image)
    assert out.mode == "RGB" and out.size == image.size
    return np.asarray(out)


def test_rgb_is_returned_unchanged():
    image = random_image(4, 3)
    assert ip.load_rgb(image) is image


def test_8bit_modes_follow_pil_convert():
    gray = np.array([[0, 100, 255]], np.uint8)
    np.testing.assert_array_equal(rgb_of(Image.fromarray(gray))[..., 0], gray)
    np.testing.assert_array_equal(rgb_of(Image.fromarray(gray > 50)), [[[0] * 3, [255] * 3, [255] * 3]])  # mode "1"
    la = Image.fromarray(np.stack([gray, np.zeros_like(gray)], -1))
    assert la.mode == "LA"
    np.testing.assert_array_equal(rgb_of(la)[..., 1], gray)  # alpha dropped, not composited
    rgba = Image.fromarray(np.array([[[10, 20, 30, 0], [40, 50, 60, 255]]], np.uint8))
    np.testing.assert_array_equal(rgb_of(rgba), [[[10, 20, 30], [40, 50, 60]]])
    pal = Image.fromarray(np.array([[0, 1, 2]], np.uint8)).convert("L").convert("P")
    pal.putpalette([9, 8, 7, 1, 2, 3, 250, 251, 252] + [0] * (256 * 3 - 9))
    np.testing.assert_array_equal(rgb_of(pal), [[[9, 8, 7], [1, 2, 3], [250, 251, 252]]])
    pa = pal.convert("PA")
    np.testing.assert_array_equal(rgb_of(pa), [[[9, 8, 7], [1, 2, 3], [250, 251, 252]]])
    cmyk = Image.frombytes("CMYK", (2, 1), bytes([0, 0, 0, 0, 255, 0, 0, 0]))
    np.testing.assert_array_equal(rgb_of(cmyk), [[[255, 255, 255], [0, 255, 255]]])
    ycc = Image.frombytes("YCbCr", (1, 1), bytes([100, 128, 128]))
    assert np.abs(rgb_of(ycc).astype(int) - 100).max() <= 1
    premultiplied = Image.new("La", (2, 1), (80, 255))  # PIL cannot convert "La" to RGB directly
    np.testing.assert_array_equal(rgb_of(premultiplied), [[[80] * 3, [80] * 3]])


def high_bit_depth_images():
    rng = np.random.default_rng(11)
    wide = rng.integers(0, 65536, (90, 140), dtype=np.uint16)
    return {
        "I;16": Image.fromarray(wide),
        "I;16 8-bit values": Image.fromarray(rng.integers(0, 256, (90, 140), dtype=np.uint16)),
        "I;16B": Image.frombytes("I;16B", (140, 90), wide.astype(">u2").tobytes()),
        "I": Image.fromarray(rng.integers(-300, 70000, (90, 140), dtype=np.int32)),
        "F": Image.fromarray((rng.random((90, 140)) * 400 - 50).astype(np.float32)),
        "F unit range": Image.fromarray(rng.random((90, 140)).astype(np.float32)),
    }


@pytest.mark.parametrize("name", list(high_bit_depth_images()))
def test_high_bit_depth_images_follow_both_references(name, hf_image_processor):
    # Both references convert with PIL, which clips to 0..255 (a full-range 16-bit image comes out
    # mostly white): the original opens every image with .convert("RGB"), transformers' processor
    # calls .convert("RGB") on images without an alpha band.
    image = high_bit_depth_images()[name]
    ref = hf_image_processor(images=[image], return_tensors="np")["pixel_values"][0].transpose(0, 2, 3, 1)
    pixels, _ = ip.preprocess_image(image, mode="anyres_max_9", pinpoints=PINPOINTS, convention="hf")
    np.testing.assert_allclose(normalize(pixels), ref, atol=1e-6)
    original, _ = ip.preprocess_image(image, mode="anyres_max_9", pinpoints=PINPOINTS, convention="original")
    np.testing.assert_array_equal(original, ip.crop_pixels(spec_crops(image.convert("RGB"))))


def exif_rotated_jpeg():
    """A 200x120 JPEG whose EXIF orientation (6) tells viewers to rotate it to 120x200."""
    import io

    buf = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6
    random_image(200, 120, seed=12).save(buf, format="JPEG", quality=95, exif=exif)
    return Image.open(io.BytesIO(buf.getvalue()))


def test_exif_orientation_is_ignored_as_both_references_do(hf_image_processor):
    # Neither the original (Image.open(...).convert("RGB")) nor transformers' processor (given a
    # PIL image) applies the EXIF orientation: the stored pixels are used as they are.
    image = exif_rotated_jpeg()
    assert image.getexif().get(0x0112) == 6 and image.size == (200, 120)
    ref = hf_image_processor(images=[image], return_tensors="np")["pixel_values"][0].transpose(0, 2, 3, 1)
    pixels, plan = ip.preprocess_image(image, mode="anyres_max_9", pinpoints=PINPOINTS, convention="hf")
    np.testing.assert_allclose(normalize(pixels), ref, atol=1e-6)
    original, plan = ip.preprocess_image(image, mode="anyres_max_9", pinpoints=PINPOINTS, convention="original")
    np.testing.assert_array_equal(original, ip.crop_pixels(spec_crops(image.convert("RGB"))))
    assert plan.image_size == (200, 120)


def test_load_rgb_rejects_non_images():
    with pytest.raises(TypeError):
        ip.load_rgb(np.zeros((3, 3, 3), np.uint8))
