"""Record -> ProcessedSample: templates, image modes, limits, and every bad-input case."""

import io
import os

import numpy as np
import pytest
from PIL import Image, ImageFile

from manager_jax.config import tiny
from manager_jax.data.image_processing import preprocess_image
from manager_jax.data.samples import SampleOptions, SkipCounter, SkipSample, decode_image, load_image, process_record
from manager_jax.data.synthetic import Scene, draw_scene, write_bad_examples
from manager_jax.data.tokenizer import load_tokenizer

IMG = -200


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("samples")
    draw_scene(Scene(640, 480, "red", "circle", "left")).save(root / "a.jpg", quality=90)
    draw_scene(Scene(300, 500, "blue", "square", "right")).save(root / "b.png")
    return str(root)


def opts(folder, **kw):
    return SampleOptions.from_configs(tiny(), image_folder=folder, **kw)


def ask(question="What colour is it?", answer="Red.", image=True):
    return [{"from": "human", "value": ("<image>\n" if image else "") + question}, {"from": "gpt", "value": answer}]


def test_single_image_anyres_matches_image_processing(tok, folder):
    s = process_record({"id": "r1", "image": "a.jpg", "conversations": ask()}, tok, opts(folder))
    pixels, plan = preprocess_image(Image.open(os.path.join(folder, "a.jpg")), mode="anyres_max_9",
                                    pinpoints="(1x1),...,(6x6)", grid_type="all")
    assert s.id == "r1" and s.image_sizes == [(640, 480)]
    assert np.array_equal(s.pixels, pixels)
    assert len(s.plans) == 1 and s.plans[0].num_tokens == plan.num_tokens == 2929
    assert np.array_equal(s.plans[0].src, plan.src)
    assert int((s.ids == IMG).sum()) == 1
    assert s.expanded_length == len(s.ids) - 1 + 2929
    # Labels: the answer is supervised, the image is not.
    assert s.labels[s.ids == IMG].tolist() == [-100]
    assert tok.decode([i for i in s.labels.tolist() if i >= 0]).count("Red.") == 1


def test_multi_image_records_use_pad_mode(tok, folder):
    rec = {"id": "m", "image": ["a.jpg", "b.png"], "conversations": ask("<image> <image>\nSame colour?", "No.", image=False)}
    s = process_record(rec, tok, opts(folder))
    assert [p.num_crops for p in s.plans] == [1, 1]
    assert [p.num_tokens for p in s.plans] == [729, 729]  # original convention: no newline
    assert s.pixels.shape == (2, 384, 384, 3)
    # Pad mode: the portrait image is centred on (127,127,127); its left edge is grey.
    assert s.pixels.dtype == np.uint8 and np.all(np.abs(s.pixels[1, 192, 2].astype(int) - 127) <= 5)


def test_text_only_record(tok, folder):
    s = process_record({"id": "t", "conversations": ask("Repeat: apple", "apple", image=False)}, tok, opts(folder))
    assert s.plans == [] and s.pixels.shape[0] == 0 and IMG not in s.ids.tolist()
    assert s.expanded_length == len(s.ids)


def test_plain_template_keeps_only_image_and_caption(tok, folder):
    rec = {"id": "p", "image": "a.jpg", "conversations": ask("Describe.", "A red circle on the left.")}
    s = process_record(rec, tok, opts(folder, template="plain"))
    assert s.ids[0] == IMG
    assert tok.decode(s.ids[1:].tolist()) == "A red circle on the left.\n"
    assert s.labels[0] == -100 and (s.labels[1:] == s.ids[1:]).all()


def test_image_bytes_records_need_no_folder(tok, folder):
    with open(os.path.join(folder, "a.jpg"), "rb") as f:
        data = f.read()
    rec = {"id": "b", "image": "a.jpg", "image_bytes": [data], "conversations": ask()}
    from_bytes = process_record(rec, tok, opts(None))
    from_file = process_record({"id": "b", "image": "a.jpg", "conversations": ask()}, tok, opts(folder))
    assert np.array_equal(from_bytes.pixels, from_file.pixels) and np.array_equal(from_bytes.ids, from_file.ids)


def test_every_bad_input_case_gets_its_reason(tok, tmp_path):
    cases = write_bad_examples(str(tmp_path))
    reasons = {r for _, r in cases if r}
    assert reasons >= {"missing_image", "truncated_image", "zero_size_image", "unreadable_image",
                       "no_conversations", "no_assistant_turn", "image_count_mismatch"}
    counter = SkipCounter()
    for record, expected in cases:
        try:
            sample = process_record(record, tok, opts(str(tmp_path)))
        except SkipSample as skip:
            assert skip.reason == expected, (record["id"], skip)
            assert skip.record_id == record["id"]
            counter.add(skip)
            continue
        assert expected is None, f"{record['id']} should be skipped ({expected})"
        assert sample.pixels.dtype == np.uint8
    summary = counter.summary()
    assert summary["total"] == sum(1 for _, r in cases if r)
    assert summary["by_reason"]["image_count_mismatch"] == 3 and summary["by_reason"]["no_conversations"] == 2


def test_an_image_that_fails_to_decode_releases_its_file(tmp_path, monkeypatch):
    """A lazily opened image (`Image.open(path)`, as an lmms-eval task's visuals may be) that fails
    to decode is closed: its file stayed open until the image was collected."""
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", False)  # lmms-eval's import sets it
    path = tmp_path / "cut.png"
    Image.new("RGB", (64, 48), (200, 10, 10)).save(path)
    path.write_bytes(path.read_bytes()[:60])
    image = Image.open(path)
    file = image.fp
    with pytest.raises(SkipSample) as skip:
        decode_image(image, "cut.png", "r1")
    assert skip.value.reason == "truncated_image" and file.closed


@pytest.mark.parametrize("mode", ["CMYK", "P", "RGBA", "LA", "L", "I;16"])
def test_non_rgb_modes_are_converted(mode):
    base = draw_scene(Scene(64, 48, "green", "square", "centre"))
    if mode == "I;16":
        img = Image.fromarray((np.asarray(base.convert("L"), np.uint16) * 257))
    elif mode == "P":
        img = base.convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    else:
        img = base.convert(mode)
    buf = io.BytesIO()
    img.save(buf, format="JPEG" if mode == "CMYK" else "PNG")
    out = load_image("x", buf.getvalue(), image_folder=None, rid="x")
    assert out.mode == "RGB" and out.size == (64, 48)
    centre = np.asarray(out)[24, 32].astype(int)
    expected = np.asarray(base.convert("L" if mode in ("LA", "L") else "RGB").convert("RGB"))[24, 32].astype(int)
    if mode == "I;16":  # PIL clips 16-bit values to 255, as the original's .convert("RGB") does
        expected = np.asarray(img.convert("RGB"))[24, 32].astype(int)
    assert np.abs(centre - expected).max() <= 12  # same colour up to JPEG / palette error


def test_hf_convention_records_lay_transparent_images_over_white_as_transformers(tok, tmp_path):
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil

    rgba = np.zeros((40, 60, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:, :30, 3] = 255  # left half opaque red, right half fully transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "t.png")
    rec = {"id": "t", "image": "t.png", "conversations": ask()}
    hf_opts = SampleOptions.from_configs(tiny(), image_folder=str(tmp_path), convention="hf", image_mode="square")
    sample = process_record(rec, tok, hf_opts)
    processor = LlavaOnevisionImageProcessorPil(image_mean=[0.5] * 3, image_std=[0.5] * 3, size={"height": 384, "width": 384})
    ref = processor(images=[Image.open(tmp_path / "t.png")], return_tensors="np")["pixel_values"][0][0]  # the base crop
    np.testing.assert_allclose(sample.pixels[0].astype(np.float32) / 127.5 - 1, ref.transpose(1, 2, 0), atol=1e-5)
    assert (sample.pixels[0, :, -20:] == 255).all()  # the clear half is white
    original = process_record(rec, tok, opts(str(tmp_path), image_mode="square"))
    assert (original.pixels[0, :, -20:] == (200, 0, 0)).all()  # the original drops alpha


def test_size_limits_skip_before_pixel_work(tok, folder):
    rec = {"id": "big", "image": "a.jpg", "conversations": ask()}  # 2929 image tokens, 5 crops
    with pytest.raises(SkipSample, match="too_long"):
        process_record(rec, tok, opts(folder, seq_len=2000))
    assert process_record(rec, tok, opts(folder, seq_len=2000, truncate=True)).expanded_length > 2000
    with pytest.raises(SkipSample, match="too_many_crops"):
        process_record(rec, tok, opts(folder, max_crops=4))
    with pytest.raises(SkipSample, match="too_many_image_tokens"):
        process_record(rec, tok, opts(folder, max_image_tokens=2928))


def test_bad_configuration_fails_when_options_are_built():
    with pytest.raises(ValueError):
        SampleOptions(image_mode="anyres_max_x")
    with pytest.raises(ValueError, match="template"):
        SampleOptions(template="llama3")


def test_skip_counter_state_round_trip():
    c = SkipCounter(max_examples=2)
    for i in range(3):
        c.add(SkipSample("missing_image", f"id{i}"))
    c.add(SkipSample("too_long", "x", "900 tokens > seq_len 512"))
    assert c.details == {"missing_image": "record id0", "too_long": "record x: 900 tokens > seq_len 512"}
    assert c.summary() == {"total": 4, "by_reason": {"missing_image": 3, "too_long": 1},
                           "examples": {"missing_image": ["id0", "id1"], "too_long": ["x"]}}
    d = SkipCounter()
    d.set_state(c.get_state())
    assert d.summary() == c.summary() and d.details == c.details


def test_a_video_record_is_skipped_as_unsupported_not_as_an_image_count_mismatch(tok, tmp_path):
    record = {"id": "v1", "video": "clips/a.mp4",
              "conversations": [{"from": "human", "value": "<image>\nWhat happens?"}, {"from": "gpt", "value": "A fall."}]}
    with pytest.raises(SkipSample) as skip:
        process_record(record, tok, opts(str(tmp_path)))
    assert skip.value.reason == "video_unsupported" and "clips/a.mp4" in skip.value.detail
