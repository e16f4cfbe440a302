"""Warnings about masks people made (masks/checks.py, images.load_masks): what a run
would otherwise spend its time on silently."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from PIL import Image

from scenebreak.errors import InvalidInput, InvalidMask
from scenebreak.images import load_image, load_masks, mask_array, orientation
from scenebreak.masks.checks import mask_warnings
from scenebreak.masks.files import MaskResult, write_masks


def _photo(path, size, turned=1):
    exif = Image.Exif()
    if turned != 1:
        exif[0x0112] = turned
    Image.new("RGB", size, (90, 120, 30)).save(path, exif=exif)
    return path


def _mask(path, size, box):
    array = np.zeros(size[::-1], np.uint8)
    x0, y0, x1, y1 = box
    array[y0:y1, x0:x1] = 255
    Image.fromarray(array).save(path)
    return path


def _warnings(photo_path, mask_paths, objects=True):
    photo, notes = load_image(photo_path), []
    masks = load_masks(mask_paths, photo.size, orientation(photo), notes)
    return mask_warnings(photo_path, photo.size, orientation(photo), masks, mask_paths, notes, objects)


def test_a_mask_over_nearly_the_whole_photo_is_taken_for_inverted(tmp_path):
    photo = _photo(tmp_path / "p.png", (40, 30))
    inverted = np.full((30, 40), 255, np.uint8)
    inverted[10:20, 10:20] = 0  # white background, black object
    Image.fromarray(inverted).save(tmp_path / "inv.png")
    [line] = _warnings(photo, [tmp_path / "inv.png"])
    assert "covers 92% of the photo: inverted?" in line
    assert _warnings(photo, [_mask(tmp_path / "ok.png", (40, 30), (5, 5, 20, 20))]) == []
    assert _warnings(photo, [tmp_path / "inv.png"], objects=False) == []  # edit's regions may cover most of a photo


def test_an_inverted_mask_of_a_large_object_is_taken_for_inverted_too(tmp_path):
    """Only masks over 90% were: an object of a third of the photo, inverted, was
    learned as the background without a word. Framing a hole is what tells."""
    photo = _photo(tmp_path / "p.png", (40, 30))
    inverted = np.full((30, 40), 255, np.uint8)
    inverted[5:25, 8:30] = 0
    Image.fromarray(inverted).save(tmp_path / "inv.png")
    [line] = _warnings(photo, [tmp_path / "inv.png"])
    assert "covers 63% of the photo: inverted?" in line
    # A large object that reaches the edges on some sides only, and one with a hole, are no such thing.
    assert _warnings(photo, [_mask(tmp_path / "big.png", (40, 30), (0, 0, 30, 30))]) == []
    ring = np.zeros((30, 40), np.uint8)
    ring[2:28, 2:38] = 255
    ring[10:20, 15:25] = 0
    Image.fromarray(ring).save(tmp_path / "ring.png")
    assert _warnings(photo, [tmp_path / "ring.png"]) == []


def test_the_same_object_twice_is_named(tmp_path):
    photo = _photo(tmp_path / "p.png", (40, 30))
    a = _mask(tmp_path / "a.png", (40, 30), (5, 5, 20, 20))
    b = _mask(tmp_path / "b.png", (40, 30), (22, 5, 35, 20))
    [line] = _warnings(photo, [a, b, a])
    assert f"masks {a} and {a} are 100% the same" in line and "two handles for one object" in line
    inner = _mask(tmp_path / "inner.png", (40, 30), (8, 8, 15, 15))
    assert _warnings(photo, [a, inner]) == []  # a part of an object is a handle of its own


def test_a_soft_mask_is_noted_with_what_it_covers(tmp_path):
    photo = _photo(tmp_path / "p.png", (40, 40))
    soft = np.zeros((40, 40), np.uint8)
    soft[5:35, 5:35] = 20  # a faint feather...
    soft[15:25, 15:25] = 255  # ... around a firm core
    Image.fromarray(soft).save(tmp_path / "soft.png")
    [line] = _warnings(photo, [tmp_path / "soft.png"])
    assert "is soft" in line and "covers 56% of the photo" in line and "cover 6%" in line
    # JPEG's ringing around a hard mask is no feather.
    Image.open(_mask(tmp_path / "hard.png", (40, 40), (8, 8, 30, 30))).save(tmp_path / "hard.jpg", quality=75)
    assert _warnings(photo, [tmp_path / "hard.jpg"]) == []
    # A mask of 0 and 1 (numpy's and OpenCV's way), 8-bit or 16-bit, has one level: hard.
    ones = np.zeros((40, 40), np.uint8)
    ones[5:35, 5:35] = 1
    Image.fromarray(ones).save(tmp_path / "ones.png")
    Image.fromarray(ones.astype(np.uint16)).save(tmp_path / "ones16.png")
    assert _warnings(photo, [tmp_path / "ones.png"]) == [] and _warnings(photo, [tmp_path / "ones16.png"]) == []


@pytest.mark.parametrize("turned, size, warned", [(3, (40, 30), True), (2, (40, 30), True), (6, (30, 30), True),
                                                   (1, (40, 30), False), (6, (40, 30), False)])
def test_a_rotated_photo_is_named_where_the_sizes_cannot_tell(tmp_path, turned, size, warned):
    """Upside down, mirrored, or square: a mask of the stored pixels has the right size."""
    photo = _photo(tmp_path / "p.jpg", size, turned)
    upright = load_image(photo).size
    mask = _mask(tmp_path / "m.png", upright, (2, 2, 12, 12))
    lines = _warnings(photo, [mask])
    assert bool(lines) == warned and all("EXIF rotation" in line for line in lines)


def test_masks_scenebreak_wrote_for_a_rotated_photo_are_not_warned_about(tmp_path):
    photo = _photo(tmp_path / "p.jpg", (40, 30), 3)
    image = load_image(photo)
    array = np.zeros(image.size[::-1], np.uint8)
    array[3:9, 4:12] = 1
    result = MaskResult("cat", "box", 1.0, array)
    write_masks(photo, image, [result], tmp_path)
    assert _warnings(photo, [result.path]) == []
    Image.open(result.path).transpose(Image.Transpose.ROTATE_180).save(result.path)  # changed by hand
    assert "EXIF rotation" in _warnings(photo, [result.path])[0]


def test_a_mask_of_a_sideways_photos_stored_pixels_is_refused_saying_why(tmp_path):
    photo = _photo(tmp_path / "p.jpg", (40, 30), 6)
    stored = _mask(tmp_path / "m.png", (40, 30), (2, 2, 12, 12))
    with pytest.raises(InvalidMask, match="30x40: masks must match the image size \\(the photo is stored sideways"):
        _warnings(photo, [stored])
    _photo(tmp_path / "q.jpg", (40, 30))
    with pytest.raises(InvalidMask, match="image size$"):
        _warnings(tmp_path / "q.jpg", [_mask(tmp_path / "n.png", (30, 40), (2, 2, 12, 12))])


def test_a_mask_on_a_transparent_layer_is_its_alpha_whatever_its_colour():
    # A black brush on a transparent layer, with a row of grey anti-aliasing: colour
    # first made it that row alone.
    brush = np.zeros((30, 30, 4), np.uint8)
    brush[5:25, 5:25, 3] = 255
    brush[5, 5:25, :3] = 90
    assert mask_array(Image.fromarray(brush, "RGBA")).sum() == 400
    # A cut-out (the photo's colours, the object in alpha) keeps its black pixels.
    rng = np.random.default_rng(0)
    cutout = np.zeros((30, 30, 4), np.uint8)
    cutout[..., :3] = rng.integers(1, 256, (30, 30, 3))
    cutout[10:12, 10:12, :3] = 0
    cutout[5:25, 5:25, 3] = 255
    assert mask_array(Image.fromarray(cutout, "RGBA")).sum() == 400
    cutout[5:25, 5:12, :3] = 0  # a third of the object in black shadow, the rest in colour (it was read as a drawing)
    assert mask_array(Image.fromarray(cutout, "RGBA")).sum() == 400
    # A black-and-white drawing with transparent margins stays its white part, small or not.
    drawing = np.zeros((30, 30, 4), np.uint8)
    drawing[1:29, 1:29, 3] = 255
    drawing[3:5, 3:5, :3] = 255
    assert mask_array(Image.fromarray(drawing, "RGBA")).sum() == 4
    drawing[3:20, 3:20, :3] = 255
    assert mask_array(Image.fromarray(drawing, "RGBA")).sum() == 17 * 17
    drawing[19, 3:20, :3] = 128  # anti-aliased along one edge: still a drawing
    assert mask_array(Image.fromarray(drawing, "RGBA")).sum() == 17 * 17


def test_transparency_given_as_one_colour_is_flattened_onto_white(tmp_path):
    Image.new("L", (8, 8), 0).save(tmp_path / "grey.png", transparency=0)
    Image.new("RGB", (8, 8), (0, 0, 0)).save(tmp_path / "rgb.png", transparency=(0, 0, 0))
    for name in ("grey.png", "rgb.png"):
        assert np.asarray(load_image(tmp_path / name)).min() == 255, name


def test_a_heic_photo_says_what_reads_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pillow_heif", None)  # not installed
    (tmp_path / "IMG_0001.HEIC").write_bytes(b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(64))
    with pytest.raises(InvalidInput, match="HEIC/HEIF .* pipx inject scenebreak pillow-heif"):
        load_image(tmp_path / "IMG_0001.HEIC")
    (tmp_path / "text.jpg").write_text("not an image")
    with pytest.raises(InvalidInput, match="text.jpg: not an image file Pillow can read"):
        load_image(tmp_path / "text.jpg")


def test_learn_says_so_before_any_model_loads(scene_files, tmp_path, monkeypatch):
    import scenebreak.train.learn as learn_module
    from scenebreak.config import LearnConfig

    monkeypatch.setattr(learn_module, "_learn", lambda *args, **kwargs: "the models would load here")
    size = Image.open(scene_files["image"]).size
    inverted = np.full(size[::-1], 255, np.uint8)
    inverted[:10, :10] = 0
    Image.fromarray(inverted).save(tmp_path / "inverted.png")
    messages = []
    assert learn_module.learn(scene_files["image"], [tmp_path / "inverted.png", scene_files["masks"][0]], LearnConfig(),
                              name="checks", report=messages.append) == "the models would load here"
    texts = [m.text for m in messages if getattr(m, "level", "") == "warning"]
    assert len(texts) == 1 and "inverted?" in texts[0], texts


def test_masks_in_a_globs_order_past_nine_are_named(tmp_path):
    photo = _photo(tmp_path / "p.png", (40, 30))
    paths = [_mask(tmp_path / f"p.mask{n}.png", (40, 30), (n, 0, n + 2, 2)) for n in (1, 10, 2, 3, 4, 5, 6, 7, 8, 9)]
    [line] = _warnings(photo, paths)
    assert "order mask1, mask10, mask2...: handle 2 learns mask10" in line
    assert _warnings(photo, sorted(paths, key=lambda p: int(p.name[6:-4]))) == []
