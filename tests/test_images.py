from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from scenebreak.errors import InvalidInput, InvalidMask
from scenebreak.images import load_image, load_masks, mask_array, prepare, square_crop_box


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


def _padded_at_full_size(image, masks, box, resolution):
    """The crop as it was made before crop_square: the whole box padded at the photo's
    scale, then resized (what a padded crop box means)."""
    canvas = Image.new("RGB", (box[2] - box[0], box[3] - box[1]), (255, 255, 255))
    canvas.paste(image, (-box[0], -box[1]))
    crop = np.asarray(canvas.resize((resolution, resolution), Image.Resampling.BILINEAR, reducing_gap=None))
    resized = [np.asarray(Image.fromarray(m * 255).crop(box).resize((resolution, resolution), Image.Resampling.NEAREST)) > 127
               for m in masks]
    return crop, np.stack(resized).astype(np.uint8)


def _photo_with_masks(tmp_path, size, *boxes):
    width, height = size
    ys, xs = np.mgrid[:height, :width]
    rgb = np.stack([xs * 255 // max(1, width - 1), ys * 255 // max(1, height - 1), (xs + ys) % 256], -1).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "photo.png")
    paths = []
    for i, mask in enumerate(_masks(height, width, *boxes)):
        paths.append(tmp_path / f"m{i}.png")
        Image.fromarray(mask * 255).save(paths[-1])
    return tmp_path / "photo.png", paths


@pytest.mark.parametrize("size, boxes", [
    ((300, 100), [(10, 10, 40, 40), (250, 50, 290, 90)]),  # padded above and below
    ((90, 310), [(5, 7, 40, 30), (50, 280, 80, 303)]),  # padded left and right
    ((41, 700), [(3, 1, 40, 30), (2, 650, 39, 690)]),
    ((96, 80), [(12, 8, 44, 40), (52, 42, 84, 74)]),  # inside the photo
])
@pytest.mark.parametrize("resolution", [64, 96])
def test_crop_box_and_pixels_are_those_of_padding_at_full_size(tmp_path, size, boxes, resolution):
    image_path, mask_paths = _photo_with_masks(tmp_path, size, *boxes)
    prepared = prepare(image_path, mask_paths, resolution)
    masks = load_masks(mask_paths, size)
    assert prepared.crop_box == square_crop_box(masks)  # its meaning is unchanged
    crop, resized = _padded_at_full_size(load_image(image_path), masks, prepared.crop_box, resolution)
    got = np.asarray(prepared.image).astype(int)
    if prepared.crop_box[0] >= 0 and prepared.crop_box[1] >= 0:  # inside the photo: exactly as before
        assert np.array_equal(got, crop)
    else:  # padded: the same up to rounding in the resampling
        assert np.abs(got - crop).max() <= 1
    assert np.array_equal(prepared.masks, resized)


def test_a_very_long_photo_is_cropped_without_a_giant_intermediate(tmp_path):
    """20000x100 with an object near each end: the padded square would be 392
    megapixels (a decompression bomb to Pillow, 1.2 GB as RGB)."""
    import subprocess
    import sys

    if not Path("/proc/self/status").exists():
        pytest.skip("needs Linux's /proc to measure peak memory")
    width, height = 20000, 100
    image_path, mask_paths = _photo_with_masks(tmp_path, (width, height), (100, 10, 400, 90), (19500, 10, 19900, 90))
    # VmHWM: this process's peak (ru_maxrss would include the parent's, from before exec).
    code = (f"from scenebreak.images import prepare\n"
            f"p = prepare({str(image_path)!r}, {list(map(str, mask_paths))!r}, 512)\n"
            f"print(p.crop_box, int(p.masks.sum()))\n"
            f"print(next(line.split()[1] for line in open('/proc/self/status') if line.startswith('VmHWM')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    box, peak = done.stdout.splitlines()
    assert box.startswith("(100, -9850, 19900, 9950)") and int(box.split()[-1]) > 0
    assert int(peak) < 200 * 1024, peak  # kB: the photo and its masks, not the square


def test_naming_a_bombs_size_never_lets_another_thread_open_a_bomb(tmp_path, monkeypatch):
    """To name a too-large photo's size, Pillow's bomb limit (a global) is lifted for a
    moment: a thread of the page opening another photo in that moment read it whole."""
    import threading

    Image.new("RGB", (96, 80)).save(tmp_path / "a.png")
    Image.new("RGB", (96, 80)).save(tmp_path / "b.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # both are "bombs" now
    real_open, other = Image.open, {}

    def open_(path, *args, **kwargs):
        if Image.MAX_IMAGE_PIXELS is None and not other:  # inside the size's lifted limit: the page opens b
            def load():
                try:
                    other["result"] = load_image(tmp_path / "b.png")
                except InvalidInput as exc:
                    other["result"] = exc

            other["thread"] = threading.Thread(target=load)
            other["thread"].start()
            other["thread"].join(0.5)  # (it waits for the limit to be back)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(Image, "open", open_)
    with pytest.raises(InvalidInput, match="96x80"):
        load_image(tmp_path / "a.png")
    other["thread"].join(10)
    assert isinstance(other["result"], InvalidInput) and "96x80" in str(other["result"])
    assert Image.MAX_IMAGE_PIXELS == 1000
