import numpy as np
import pytest
from PIL import Image

from scenebreak.errors import InvalidInput, InvalidMask
from scenebreak.images import load_image, mask_array, prepare, square_crop_box


def _masks(h, w, *boxes):
    out = []
    for x0, y0, x1, y1 in boxes:
        m = np.zeros((h, w), np.uint8)
        m[y0:y1, x0:x1] = 1
        out.append(m)
    return np.stack(out)


def test_crop_is_the_largest_square_keeping_every_mask_pixel():
    masks = _masks(100, 300, (110, 10, 140, 40), (160, 50, 200, 90))
    left, top, right, bottom = square_crop_box(masks)
    assert right - left == bottom - top == 100  # the short side
    assert (top, bottom) == (0, 100)
    ys, xs = np.nonzero(masks.max(0))
    assert left <= xs.min() and right > xs.max()
    assert abs((left + right) / 2 - (110 + 200) / 2) <= 1  # centred on the masks


def test_crop_keeps_masks_inside_when_they_fit():
    masks = _masks(100, 300, (220, 10, 280, 40))
    left, top, right, bottom = square_crop_box(masks)
    assert (top, bottom) == (0, 100)
    assert left <= 220 and right >= 280 and 0 <= left and right <= 300


def test_masks_wider_than_the_short_side_pad_instead_of_cutting():
    masks = _masks(100, 300, (10, 10, 40, 40), (250, 50, 290, 90))
    left, top, right, bottom = square_crop_box(masks)
    assert right - left == 280 and bottom - top == 280
    assert left <= 10 and right >= 290 and top < 0  # reaches past the photo: padded


def test_prepare_resizes_and_keeps_objects(scene_files):
    prepared = prepare(scene_files["image"], scene_files["masks"], 64)
    assert prepared.image.size == (64, 64)
    assert prepared.masks.shape == (2, 64, 64)
    assert set(np.unique(prepared.masks)) == {0, 1}
    red = np.asarray(prepared.image)[prepared.masks[0] == 1].mean(0)
    assert red[0] > 150 and red[2] < 100
    assert prepared.crop_box == (8, 0, 88, 80)


def test_alpha_is_flattened_onto_white(tmp_path):
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0] = 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    assert np.asarray(load_image(tmp_path / "a.png")).min() == 255


def test_any_nonzero_pixel_is_inside():
    rgb = np.zeros((4, 4, 3), np.uint8)
    rgb[1, 1, 2] = 1
    assert mask_array(Image.fromarray(rgb)).sum() == 1
    assert mask_array(Image.fromarray(np.full((4, 4), 7, np.uint8))).sum() == 16


def test_mask_of_another_size_is_refused(scene_files, tmp_path):
    Image.new("L", (10, 10), 255).save(tmp_path / "small.png")
    with pytest.raises(InvalidMask, match="masks must match the image size"):
        prepare(scene_files["image"], [tmp_path / "small.png"], 64)


def test_empty_mask_is_refused(scene_files, tmp_path):
    Image.new("L", (96, 80), 0).save(tmp_path / "empty.png")
    with pytest.raises(InvalidMask, match="empty"):
        prepare(scene_files["image"], [tmp_path / "empty.png"], 64)


def test_missing_and_unreadable_files(scene_files, tmp_path):
    with pytest.raises(InvalidInput, match="not found"):
        prepare(tmp_path / "nope.jpg", scene_files["masks"], 64)
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(InvalidInput, match="cannot read"):
        prepare(tmp_path / "text.png", scene_files["masks"], 64)
    with pytest.raises(InvalidMask, match="no masks"):
        prepare(scene_files["image"], [], 64)


def test_exif_rotation_is_applied(tmp_path):
    image = Image.new("RGB", (40, 20), (200, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    image.save(tmp_path / "phone.jpg", exif=exif)
    assert load_image(tmp_path / "phone.jpg").size == (20, 40)
