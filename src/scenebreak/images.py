"""Reading the photo and its masks, and cropping both to the training square."""

from __future__ import annotations

import hashlib
import math
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import InvalidInput, InvalidMask
from .paths import is_regular_file


@dataclass
class PreparedImage:
    """The training crop: an RGB image and N binary masks, all R x R."""

    image: "PIL.Image.Image"  # noqa: F821 - RGB, R x R
    masks: np.ndarray  # (N, R, R) uint8 in {0, 1}
    crop_box: tuple[int, int, int, int]  # left, top, right, bottom in source pixels (may pass the edges: padded)
    source_size: tuple[int, int]  # width, height of the photo
    source_sha256: str
    icc_profile: bytes | None = None  # the photo's RGB colour profile, if it has one


_BOMB_LIMIT = threading.RLock()  # held while an image is opened, and while _too_big lifts Pillow's limit
ORIENTATION = "scenebreak.orientation"  # in an opened image's info: the EXIF orientation it was turned upright from
_EXIF_ORIENTATION = 0x0112
_HEIF_BRANDS = (b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1")


def _open(path: Path, what: str):
    import warnings

    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    if not path.exists():
        raise InvalidInput(f"{what} not found: {path}")
    if path.is_dir():
        raise InvalidInput(f"{what} is a folder, not an image: {path}")
    if not is_regular_file(path):  # a FIFO or a device: reading it would block or never end
        raise InvalidInput(f"{what} {path} is not a regular file")
    if _is_heif(path):
        _read_heif(path, what)
    try:
        with warnings.catch_warnings():
            # Pillow warns from half its bomb limit on; such photos are merely big.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            # Its notes on odd but readable files ("Corrupt EXIF data") would break the one-line output.
            warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")
            with _BOMB_LIMIT:  # (never while _too_big has lifted the limit: open checks it)
                image = Image.open(path)
            image.load()
            # Phone photos are often stored sideways with an EXIF rotation: use them the
            # way every viewer (and mask editor) shows them.
            orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
            image = ImageOps.exif_transpose(image)
    except Image.DecompressionBombError:
        raise InvalidInput(_too_big(path, what)) from None
    except UnidentifiedImageError:
        raise InvalidInput(f"cannot read {what} {path}: not an image file Pillow can read (JPEG, PNG, WebP, TIFF, "
                           "BMP, GIF...)") from None
    except (OSError, ValueError) as exc:
        raise InvalidInput(f"cannot read {what} {path}: {exc}") from None
    image.info[ORIENTATION] = orientation if orientation in range(2, 9) else 1
    return image


def _is_heif(path: Path) -> bool:
    """An HEIC/HEIF file (an iPhone's photos): an ISO box `ftyp` with a HEIF brand."""
    try:
        with open(path, "rb") as file:
            head = file.read(12)
    except OSError:
        return False
    return head[4:8] == b"ftyp" and head[8:12] in _HEIF_BRANDS


def _read_heif(path: Path, what: str) -> None:
    """Pillow reads HEIC only through the pillow-heif plug-in: used where installed."""
    try:
        import pillow_heif
    except ImportError:
        raise InvalidInput(f"cannot read {what} {path}: it is HEIC/HEIF (an iPhone's format), which needs pillow-heif: "
                           "pipx inject scenebreak pillow-heif, or export it as JPEG or PNG") from None
    pillow_heif.register_heif_opener()


def orientation(image) -> int:
    """The EXIF orientation (2..8) an image was turned upright from when opened; 1: none."""
    return image.info.get(ORIENTATION, 1)


def _too_big(path: Path, what: str) -> str:
    """The message for an image past Pillow's decompression-bomb limit, with its size."""
    from PIL import Image

    limit = 2 * (Image.MAX_IMAGE_PIXELS or 0)  # Pillow refuses above twice MAX_IMAGE_PIXELS
    with _BOMB_LIMIT:  # the limit is Pillow's global: no other thread opens an image meanwhile
        saved = Image.MAX_IMAGE_PIXELS
        try:
            Image.MAX_IMAGE_PIXELS = None  # read the header only, to name the size
            with Image.open(path) as image:
                width, height = image.size
            size = f"{width}x{height} ({width * height / 1e6:.0f} megapixels)"
        except Exception:  # noqa: BLE001 - the size is a courtesy
            size = "too large"
        finally:
            Image.MAX_IMAGE_PIXELS = saved
    return (f"{what} {path} is {size}, over Pillow's safety limit of {limit / 1e6:.0f} megapixels against "
            f"decompression bombs: downscale it (4096 pixels on the long side is plenty; the model works at "
            f"about 512) and pass the smaller file")


# Single-channel modes of more than 8 bits (16-bit PNGs and TIFFs), and their full scale.
_WIDE_GREY = {"I;16": 65535, "I;16L": 65535, "I;16B": 65535, "I;16N": 65535, "I": 65535, "F": None}


def _grey_to_8bit(image):
    """A 16-bit (or 32-bit integer, or float) grey image as 8-bit "L", scaled rather
    than clipped: Pillow's own conversion clips, which turns most 16-bit photos white."""
    from PIL import Image

    array = _wide_grey_in_255ths(image)
    return Image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8), "L")


def _wide_grey_in_255ths(image) -> np.ndarray:
    """A wide grey image's values (float64) on 8-bit's scale: 16-bit ones over 65535,
    floats over 1 when they look like 0..1, else as they are."""
    array = np.asarray(image).astype(np.float64)
    full = _WIDE_GREY[image.mode]
    if full is None:  # float: 0..1 when it looks like it, else 0..255
        full = 1.0 if array.size and array.max() <= 1.0 else 255.0
    return array * (255.0 / full)


def _cmyk_to_rgb(image):
    """CMYK through its embedded ICC profile when it has one (print files look far too
    saturated through the naive formula), else Pillow's conversion."""
    profile = image.info.get("icc_profile")
    if profile:
        try:
            import io

            from PIL import ImageCms

            source = ImageCms.ImageCmsProfile(io.BytesIO(profile))
            return ImageCms.profileToProfile(image, source, ImageCms.createProfile("sRGB"), outputMode="RGB")
        except Exception:  # noqa: BLE001 - a broken profile: fall back to the formula
            pass
    return image.convert("RGB")


def rgb_profile(profile: bytes | None) -> bytes | None:
    """`profile` where it describes RGB colours, else None: a grey photo's grey profile
    on the RGB image made from it is no valid PNG (viewers cannot use it)."""
    if not profile:
        return None
    try:
        import io

        from PIL import ImageCms

        return profile if ImageCms.ImageCmsProfile(io.BytesIO(profile)).profile.xcolor_space.strip() == "RGB" else None
    except Exception:  # noqa: BLE001 - a broken profile is dropped
        return None


def has_alpha(image) -> bool:
    """Transparency as a channel, or as one colour (a PNG's tRNS chunk, in any mode)."""
    return image.mode in ("RGBA", "RGBa", "LA", "La", "PA") or (image.mode in ("P", "L", "RGB", "1") and
                                                                 "transparency" in image.info)


def load_image(path: Path):
    """An RGB image: 16-bit grey scaled to 8 bits, CMYK through its colour profile,
    palettes expanded; transparency is flattened onto white. An RGB colour profile is
    kept in `info` (the numbers are used as they are, as everywhere in the field), so
    that `edit` can give its output the photo's own."""
    from PIL import Image

    image = _open(path, "image")
    turned, profile = orientation(image), image.info.get("icc_profile")
    if image.mode in _WIDE_GREY:
        image = _grey_to_8bit(image)
    elif image.mode == "CMYK":
        image, profile = _cmyk_to_rgb(image), None  # (now sRGB: the print profile no longer describes it)
    if has_alpha(image):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba)
    image = image.convert("RGB")
    image.info.clear()
    image.info[ORIENTATION] = turned
    profile = rgb_profile(profile)
    if profile:
        image.info["icc_profile"] = profile
    return image


def mask_strength(image) -> np.ndarray:
    """(H, W) uint8: how strongly each pixel of a mask file marks the object, 0 outside.
    Colour (the brightest channel) on an opaque mask; on one with transparency, its
    alpha, unless the visible part is itself a black-and-white drawing (at least 10%
    black, the rest nearly all white): a black brush on a transparent layer, or a cut-out whose
    object has black pixels among its colours, is its alpha (by colour those were
    nearly empty, or full of holes)."""
    if has_alpha(image):
        rgba = np.asarray(image.convert("RGBA"))
        alpha, colour = rgba[..., 3], rgba[..., :3].max(axis=-1)
        visible = alpha > 0
        if visible.all() or not visible.any():
            return colour * visible
        shown = colour[visible]
        black = float((shown == 0).mean())
        lit = shown[shown > 0]
        # (a photo's colours are not nine tenths pure white, as a drawing's are but for its
        # anti-aliased edges: a cut-out with a third of its object in black shadow lost
        # those pixels when read as a drawing)
        drawing = black >= 0.1 and lit.size > 0 and float((lit >= 250).mean()) > 0.9
        return colour * visible if drawing else alpha
    if image.mode in _WIDE_GREY:
        return np.clip(np.ceil(_wide_grey_in_255ths(image)), 0, 255).astype(np.uint8)  # (ceil: non-zero stays non-zero)
    if image.mode == "1":
        return np.asarray(image).astype(np.uint8) * 255
    if image.mode == "L":
        return np.asarray(image)
    return np.asarray(image.convert("RGB")).max(axis=-1)


def mask_array(image) -> np.ndarray:
    """Any non-zero pixel is inside (mask_strength); a transparent pixel never is."""
    return (mask_strength(image) > 0).astype(np.uint8)


# A mask is soft (feathered, a matte) when this share of its inside is fainter than half.
SOFT_SHARE = 0.25


def load_masks(paths: list[Path], size: tuple[int, int], turned: int = 1, notes: list[str] | None = None) -> np.ndarray:
    """The masks (N, H, W) in {0, 1} of a photo of `size`, turned upright from EXIF
    orientation `turned`; `notes` gets a line for each soft mask."""
    if not paths:
        raise InvalidMask("no masks given: pass one mask per object with --masks M1 [M2 ...]")
    masks = []
    for path in paths:
        image = _open(path, "mask")
        if image.size != size:
            sideways = image.size == size[::-1] and turned in range(5, 9)
            raise InvalidMask(
                f"mask {path} is {image.size[0]}x{image.size[1]} but the image is {size[0]}x{size[1]}: masks must match "
                "the image size" + (" (the photo is stored sideways with an EXIF rotation, and read upright as viewers "
                                    "show it: draw the mask on the upright photo)" if sideways else ""))
        strength = mask_strength(image)
        mask = (strength > 0).astype(np.uint8)
        if not mask.any():
            raise InvalidMask(f"mask {path} is empty: it has no non-zero pixel")
        inside = int(mask.sum())
        firm = int((strength >= 128).sum())
        # One level inside (0/1, as numpy and OpenCV save masks) is hard, however faint.
        one_level = strength[mask.astype(bool)].min() == strength.max()
        if notes is not None and inside - firm > SOFT_SHARE * inside and not one_level:
            notes.append(f"mask {path} is soft (feathered, or a matte): every non-zero pixel counts as the object, so "
                         f"it covers {inside / mask.size:.0%} of the photo where its pixels of half strength and more "
                         f"cover {firm / mask.size:.0%}: threshold it if that is looser than you meant")
        masks.append(mask)
    return np.stack(masks)


def square_crop_box(masks: np.ndarray) -> tuple[int, int, int, int]:
    """The largest square inside the photo that keeps every mask pixel, centred on
    the masks; when the masks span more than the short side, a bigger square that
    reaches past the photo's edges (the outside is padded)."""
    _, height, width = masks.shape
    ys, xs = np.nonzero(masks.max(axis=0))
    x0, x1, y0, y1 = int(xs.min()), int(xs.max()) + 1, int(ys.min()), int(ys.max()) + 1
    side = max(min(width, height), x1 - x0, y1 - y0)

    def place(lo: int, hi: int, extent: int) -> int:
        start = (lo + hi - side) // 2  # centred on the masks
        if side <= extent:
            start = min(max(start, 0), extent - side)  # stay inside the photo
        return start

    left, top = place(x0, x1, width), place(y0, y1, height)
    return left, top, left + side, top + side


def crop_square(image, box: tuple[int, int, int, int], resolution: int, resample, fill):
    """`image` cut to the square `box` (which may reach past its edges: `fill` there)
    and resized to `resolution`: what padding the image to the whole box and resizing
    that gives, without building the box at the image's scale (392 megapixels for
    objects at both ends of a 20000x100 panorama). Only the output pixels that see the
    image are resized, from the image and the little padding their filter reads."""
    from PIL import Image

    left, top, right, bottom = box
    width, height = image.size
    size = (resolution, resolution)
    if left >= 0 and top >= 0 and right <= width and bottom <= height:
        return image.crop(box).resize(size, resample, reducing_gap=None)
    scale = resolution / (right - left)
    kind = Image.Resampling
    support = {kind.NEAREST: 0.0, kind.BOX: 0.5, kind.BILINEAR: 1.0, kind.HAMMING: 1.0, kind.BICUBIC: 2.0, kind.LANCZOS: 3.0}
    reach = support[resample] * max(1.0, 1 / scale)  # image pixels a filter reads each side of a centre

    def span(start: int, stop: int, extent: int) -> tuple[int, int, int, int]:
        """Along one axis: the output pixels [first, end) that may see the image, and
        the part of the box [low, high) their filter reads, in image pixels."""
        first = max(0, math.floor((-start - reach - 1) * scale - 0.5))
        end = min(resolution, math.ceil((extent - start + reach + 1) * scale - 0.5))
        low = max(start, math.floor(start + first / scale - reach) - 1)
        high = min(stop, math.ceil(start + end / scale + reach) + 1)
        return first, end, low, high

    x0, x1, lx, hx = span(left, right, width)
    y0, y1, ly, hy = span(top, bottom, height)
    square = Image.new(image.mode, size, fill)
    if x1 > x0 and y1 > y0:
        part = Image.new(image.mode, (hx - lx, hy - ly), fill)
        part.paste(image.crop((max(lx, 0), max(ly, 0), min(hx, width), min(hy, height))), (max(-lx, 0), max(-ly, 0)))
        source = (max(0.0, left + x0 / scale - lx), max(0.0, top + y0 / scale - ly),
                  min(hx - lx, left + x1 / scale - lx), min(hy - ly, top + y1 / scale - ly))
        square.paste(part.resize((x1 - x0, y1 - y0), resample, box=source, reducing_gap=None), (x0, y0))
    return square


def background_mask(masks: np.ndarray) -> np.ndarray:
    """The complement of the union of the object masks: what <background> learns."""
    background = 1 - masks.max(axis=0)
    if not background.any():
        raise InvalidMask("--background: the masks cover the whole image, so nothing is left for <background>")
    return background


def prepare(image_path: Path, mask_paths: list[Path], resolution: int, background: bool = False,
            loaded: tuple | None = None) -> PreparedImage:
    """Load, validate, crop to a square and resize to `resolution`. With `background`,
    one more mask follows the objects' ones: the rest of the photo (padding excluded).
    `loaded`: the photo and its masks as load_image and load_masks gave them already."""
    from PIL import Image

    image_path = Path(image_path)
    if loaded is not None:
        image, masks = loaded
    else:
        image = load_image(image_path)
        masks = load_masks([Path(p) for p in mask_paths], image.size, orientation(image))
    box = square_crop_box(masks)  # placed on the objects, whatever the background
    mask_paths = list(mask_paths)
    if background:
        masks = np.concatenate([masks, background_mask(masks)[None]])
        mask_paths.append("<background>")
    # Padding is white, like flattened alpha; masks are empty there.
    crop = crop_square(image, box, resolution, Image.Resampling.BILINEAR, (255, 255, 255))
    resized = []
    for path, mask in zip(mask_paths, masks):
        m = crop_square(Image.fromarray(mask * 255), box, resolution, Image.Resampling.NEAREST, 0)
        m = (np.asarray(m) > 127).astype(np.uint8)
        if not m.any():
            what = "the background" if path == "<background>" else f"mask {path}"
            raise InvalidMask(f"{what} is too small to survive resizing to {resolution}x{resolution}: draw it "
                              "thicker (or `scenebreak mask ... --dilate 8`), or crop the photo closer around the objects")
        resized.append(m)
    digest = hashlib.sha256(image_path.read_bytes()).hexdigest()
    return PreparedImage(crop, np.stack(resized), box, image.size, digest, image.info.get("icc_profile"))


def image_to_tensor(image):
    """PIL RGB -> (1, 3, H, W) float tensor in [-1, 1]."""
    import torch

    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0).contiguous()
