"""What the page may do, each action one library call the command line also makes:
open a photo (Segment Anything embeds it once: masks.session), make one object's mask
(`mask --point/--box/-p`), save the masks (the files `mask` writes), learn (`learn`,
cancellable and resumable), generate (`generate`) and list the scenes (`list`). The
page holds no method logic; this module holds none either, only which files it may
touch: the photo's folder, the chosen output folder and the scene cache, checked after
every link is resolved."""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import io
import threading
from pathlib import Path

from ..config import GenerateConfig, LearnConfig, MaskConfig, default_base_model
from ..errors import InvalidInput, SceneBreakError
from ..events import Message, Reporter, silent
from ..paths import fit_file_name, home, is_regular_file, is_writable_folder, resolve_scene, scene_path, valid_name
from .jobs import Job

IMAGE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp"}
MAX_UPLOAD_BYTES = 64 << 20  # a photo straight from a camera is well under this
MAX_PHOTO_PIXELS = 50_000_000  # SAM sees 1024 px anyway; more only costs memory in the mask clean-up
MAX_LISTED = 500  # photos listed from the folder
RECENT_JOBS = 4  # finished jobs whose records a reconnecting page can still read
MAX_OBJECT_MASKS = 64  # objects' masks held (the page never says which it deleted): the oldest goes first


class OutsideFolders(InvalidInput):
    """A path outside the folders the page may use (the server answers 403)."""


class Busy(SceneBreakError):
    """Another long action is running (the server answers 409)."""


class OtherPhoto(Busy):
    """The page acts on a photo that is no longer the open one: another tab opened
    another (the server answers 409)."""


PHOTO_REPLACED = "another photo was opened meanwhile (in another tab or window?): reload this page"


@contextlib.contextmanager
def _photo_still_open():
    """A click or a save that reached the photo's session after another photo closed it:
    OtherPhoto, as when it is found replaced after."""
    from ..masks.session import SessionClosed

    try:
        yield
    except SessionClosed:
        raise OtherPhoto(PHOTO_REPLACED) from None


def settings_schema(config_class) -> list[dict]:
    """The command-line settings of `config_class` as the page's form shows them: the
    same names, defaults, help, choices and bounds as the options."""
    fields = []
    for f in dataclasses.fields(config_class):
        if not f.metadata.get("cli"):
            continue
        meta, annotation, default = f.metadata, str(f.type), f.default
        kind = ("bool" if isinstance(default, bool) else "list" if annotation.startswith("tuple")
                else "choice" if meta.get("choices") else annotation.split("|")[0].strip())
        bounds = meta.get("bounds")
        fields.append({"name": f.name, "flag": "--" + f.name.replace("_", "-"), "kind": kind,
                       "default": list(default) if isinstance(default, tuple) else default, "help": meta.get("help"),
                       "choices": list(meta.get("choices") or ()) or None,
                       "low": bounds.low if bounds else None, "high": bounds.high if bounds else None})
    return fields


def numbers(value, count: int, what: str) -> tuple[float, ...]:
    """`count` numbers from a request (a click: 2, a box: 4), or a one-line refusal."""
    if not (isinstance(value, (list, tuple)) and len(value) == count
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
        raise InvalidInput(f"{what} must be {count} numbers, not {str(value)[:60]}")
    try:
        return tuple(float(v) for v in value)
    except OverflowError:  # an integer of hundreds of digits
        raise InvalidInput(f"{what} must be {count} numbers of a sensible size") from None


def listed(value, what: str) -> list:
    if value is None:
        return []
    if not isinstance(value, list):
        raise InvalidInput(f"{what} must be a list, not {str(value)[:60]}")
    return value


def config_from(config_class, values: dict | None):
    """`config_class` from the page's form: text turned into the field's type, the
    rest left to the config's own checks (the command line's messages)."""
    if values is not None and not isinstance(values, dict):
        raise InvalidInput("settings must map setting names to values")
    kinds = {f["name"]: f for f in settings_schema(config_class)}
    kwargs = {}
    for name, value in (values or {}).items():
        field = kinds.get(name)
        if field is None:
            raise InvalidInput(f"unknown setting {name!r}")
        if value is None or (isinstance(value, str) and not value.strip() and field["kind"] != "str"):
            continue
        flag, kind = field["flag"], field["kind"]
        if kind == "bool":
            if not isinstance(value, bool):
                raise InvalidInput(f"{flag} is on or off (true or false), not {value!r}")
        elif kind == "list":
            if not isinstance(value, (str, list)):
                raise InvalidInput(f"{flag} takes words (text or a list), not {str(value)[:60]}")
            value = tuple(value.split() if isinstance(value, str) else map(str, value)) or None
        elif kind in ("int", "float"):
            try:
                number = float(value) if kind == "float" else int(str(value).strip())
            except (TypeError, ValueError, OverflowError):
                raise InvalidInput(f"{flag} {str(value)[:40]!r} is not a valid {'integer' if kind == 'int' else 'float'}"
                                   ) from None
            value = number
        elif not isinstance(value, str):
            raise InvalidInput(f"{flag} takes text, not {value!r}")
        kwargs[name] = value
    return config_class(**kwargs)


# What scenebreak writes in an image it made (sampling.save_png: the JSON text chunk);
# PNG writers put text before the pixels, within the first part of the file.
_OUR_CHUNK, _CHUNK_WITHIN = b"iTXtscenebreak\0", 256 * 1024


def made_by_scenebreak(path: Path) -> bool:
    """An image `generate` or `edit` wrote (not a photo to open: the folder's list left
    them out only by the masks' names)."""
    if path.suffix.lower() != ".png" or not is_regular_file(path):  # (a FIFO would block the listing)
        return False
    try:
        with open(path, "rb") as f:
            return _OUR_CHUNK in f.read(_CHUNK_WITHIN)
    except OSError:
        return False


def png_base64(mask) -> str:
    """A 0/1 mask as the 0/255 PNG `mask` writes, base64-encoded for the page."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(mask * 255).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _pixels(path: Path, shown) -> tuple[int, int]:
    """A photo's size from its header, before anything decodes it."""
    from PIL import Image

    if not is_regular_file(path):
        raise InvalidInput(f"photo not found: {shown}")
    try:
        with Image.open(path) as image:
            return image.size
    except Image.DecompressionBombError:
        raise InvalidInput(f"{shown} has too many pixels: at most {MAX_PHOTO_PIXELS // 1_000_000} megapixels") from None
    except Exception:  # noqa: BLE001 - whatever Pillow says, the answer is the same
        raise InvalidInput(f"cannot read photo {shown}: not an image Pillow knows") from None


def _upright_as_stored(data: bytes) -> bool:
    """Whether an image's EXIF orientation (if any) leaves it as stored."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.getexif().get(0x0112, 1) in (0, 1)
    except Exception:  # noqa: BLE001 - unreadable: served as it is, the page says it cannot show it
        return True


class App:
    """The page's state: the folders it may use, the open photo and its masks, and the
    one long action running."""

    def __init__(self, photo=None, *, out_dir=None, mask_config: MaskConfig | None = None, base_model: str | None = None,
                 device: str | None = None, report: Reporter = silent):
        self.photo = Path(photo).expanduser() if photo else None
        if self.photo is not None and not is_regular_file(self.photo):
            raise InvalidInput(f"{photo} is not a file: give the path of a photo")
        self.folder = (self.photo.parent if self.photo else Path.cwd()).resolve()
        self.out_dir = Path(out_dir).expanduser().resolve() if out_dir else None
        if self.out_dir is not None and not is_writable_folder(self.out_dir):  # (said at start, not at the first Save)
            raise InvalidInput(f"--out-dir {out_dir} is not a folder you can write to: choose another")
        self.roots = [self.folder, *([self.out_dir] if self.out_dir else []), home().resolve()]
        self.mask_config = dataclasses.replace(mask_config or MaskConfig(), device=device)
        self.mask_config.validate()
        self.base_model, self.device, self.echo = base_model, device, report
        self.session = None  # masks.session.MaskSession of the open photo
        self.masks: dict[str, object] = {}  # the page's object id -> its latest MaskResult
        self.job: Job | None = None
        self.recent: dict[int, Job] = {}  # the last jobs by id, for a page's stream that reconnects after its job
        self.lock = threading.Lock()
        self.uploading = threading.Lock()
        for root in (self.folder, self.out_dir):
            if root is not None and (root == Path(root.anchor) or Path.home().resolve().is_relative_to(root)):
                # The page (with its token) reads every photo and writes masks anywhere below it.
                report(Message(f"the page may read and write photos and masks anywhere under {root}: start it in "
                               "(or with a photo in) a folder of your photos instead", "warning"))

    # -- the folders ---------------------------------------------------------------------------------

    def confined(self, path, what: str = "path") -> Path:
        """`path` (relative: to the photo's folder) with every link resolved, refused
        unless it lies in one of the allowed folders."""
        text = str(path or "").strip()
        if not text or "\0" in text:
            raise InvalidInput(f"give a {what}")
        full = Path(text).expanduser()
        resolved = (full if full.is_absolute() else self.folder / full).resolve()
        if not any(resolved.is_relative_to(root) for root in self.roots):
            raise OutsideFolders(f"{text} is outside the folders this page may use ({', '.join(map(str, self.roots))}): "
                                 "start scenebreak ui with a photo there, or with --out-dir")
        return resolved

    def read_image_file(self, path) -> tuple[bytes, str]:
        """An image under the allowed folders, for the page to show: as it is, where
        the browser shows it as scenebreak reads it; else (the open photo in a format
        browsers do not show, a TIFF say, or a WebP turned by its EXIF orientation, which
        browsers ignore there: clicks landed on other pixels) a PNG of it made upright."""
        resolved = self.confined(path, "file")
        kind = IMAGE_TYPES.get(resolved.suffix.lower())
        session = self.session
        photos = [Path(session.image_path) if session else None, self.photo]
        is_photo = any(photo is not None and resolved == photo.resolve() for photo in photos)
        if (kind is None and not is_photo) or not is_regular_file(resolved):
            raise InvalidInput(f"{path} is not an image the page can show (PNG, JPEG or WebP)")
        if resolved.stat().st_size > MAX_UPLOAD_BYTES:
            raise InvalidInput(f"{path} is over {MAX_UPLOAD_BYTES >> 20} MB")
        data = resolved.read_bytes()
        if kind in ("image/png", "image/jpeg") or (kind == "image/webp" and _upright_as_stored(data)):
            return data, kind
        from ..images import load_image

        buffer = io.BytesIO()
        load_image(resolved).save(buffer, format="PNG", compress_level=1)  # (for the screen: fast over small)
        return buffer.getvalue(), "image/png"

    # -- what the page shows ----------------------------------------------------------------------

    def state(self) -> dict:
        session = self.session
        return {
            "photo": str(session.image_path) if session else str(self.photo.resolve()) if self.photo else None,
            "ready": session is not None, "size": list(session.size) if session else None,
            "folder": str(self.folder), "out_dir": str(self.out_dir) if self.out_dir else None,
            "roots": [str(r) for r in self.roots], "base_model": self.base_model or default_base_model(),
            "settings": {"learn": settings_schema(LearnConfig), "generate": settings_schema(GenerateConfig)},
            "job": self.job.summary() if self.job else None,
            "max_upload_bytes": MAX_UPLOAD_BYTES,  # (the page says so before sending: a refused upload reads as a lost server)
        }

    def photos(self) -> list[str]:
        """The photos in the photo's folder, by name."""
        found = sorted(p.name for p in self.folder.iterdir()
                       if p.suffix.lower() in IMAGE_TYPES and not p.name.startswith(".") and ".mask" not in p.name
                       and not made_by_scenebreak(p))
        return found[:MAX_LISTED]

    def scenes(self) -> list[dict]:
        from ..scenes.catalog import scene_rows

        return scene_rows()

    # -- actions ------------------------------------------------------------------------------------

    def _start(self, kind: str, work, cancellable: bool = False, writes: bool = True) -> dict:
        with self.lock:
            self._check_idle()
            self.job = Job(kind, work, self.echo, cancellable, writes).start()
            self.recent[self.job.id] = self.job
            while len(self.recent) > RECENT_JOBS:
                del self.recent[min(self.recent)]
            return self.job.summary()

    def job_by_id(self, job_id: str | None) -> Job | None:
        """The job a page's event stream follows: that of `job_id` if it is one of the last
        few (None for another), else the current one."""
        if job_id is None:
            return self.job
        with self.lock:
            return self.recent.get(int(job_id)) if job_id.isascii() and job_id.isdigit() and len(job_id) < 12 else None

    def _check_idle(self) -> None:
        """Busy while a job runs (one at a time); the caller holds the lock."""
        if self.job and self.job.running:
            raise Busy(f"{self.job.kind} is still running: wait for it" + (" or cancel it" if self.job.cancellable else ""))

    def open_photo(self, path) -> dict:
        """Embed the photo (a job: seconds on a CPU); its masks start afresh."""
        from ..masks.session import MaskSession

        resolved = self.confined(path, "photo")
        width, height = _pixels(resolved, path)
        if width * height > MAX_PHOTO_PIXELS:
            raise InvalidInput(f"{path} has {width}x{height} pixels: at most {MAX_PHOTO_PIXELS // 1_000_000} megapixels; "
                               "make it smaller first")

        def work(report, should_stop):
            # The last photo closes first: its models wait in the keeper for this one (and the
            # last scene's, kept for more images, go: a new photo makes the next scene).
            with self.lock:
                last, self.session, self.masks = self.session, None, {}
            if last is not None:
                last.close()
            session = MaskSession(resolved, self.mask_config, report)
            with self.lock:
                self.session, self.masks = session, {}
            return {"photo": str(resolved), "size": list(session.size)}

        return self._start("photo", work, writes=False)

    def upload(self, name: str, data: bytes) -> dict:
        """A photo sent from the browser, written into the photo's folder under its own
        name (a new name if that one is taken by another file), then opened."""
        from PIL import Image

        if len(data) > MAX_UPLOAD_BYTES:
            raise InvalidInput(f"the photo is over {MAX_UPLOAD_BYTES >> 20} MB")
        self._refuse_while_running()  # before writing anything
        stem, suffix = Path(Path(str(name)).name).stem, Path(str(name)).suffix.lower()
        if suffix not in IMAGE_TYPES:
            raise InvalidInput(f"{name!r} is not a PNG, JPEG or WebP photo")
        try:
            with Image.open(io.BytesIO(data)) as image:
                image.verify()
                size, kind = image.size, Image.MIME.get(image.format or "")
        except Image.DecompressionBombError:
            raise InvalidInput(f"{name!r} has too many pixels: at most {MAX_PHOTO_PIXELS // 1_000_000} megapixels") from None
        except Exception:  # noqa: BLE001 - whatever Pillow says, the answer is the same
            raise InvalidInput(f"{name!r} cannot be read as an image") from None
        if kind != IMAGE_TYPES[suffix]:  # (a TIFF named .png was written as one, and the page could not show it)
            raise InvalidInput(f"{name!r} is {kind or 'an image of another kind'}, not the {suffix[1:].upper()} its name "
                               "says: send a PNG, JPEG or WebP photo under its own name")
        if size[0] * size[1] > MAX_PHOTO_PIXELS:
            raise InvalidInput(f"{name!r} has {size[0]}x{size[1]} pixels: at most {MAX_PHOTO_PIXELS // 1_000_000} megapixels")
        from ..paths import write_new_file

        stem = "".join(c if c.isalnum() or c in "._-" else "-" for c in stem).strip(".") or "photo"
        with self.uploading:  # two uploads of one name at once: each its own file
            for n in range(1, 1000):
                target = self.folder / fit_file_name(stem if n == 1 else f"{stem}-{n}", suffix)
                if not target.exists() or (is_regular_file(target) and target.read_bytes() == data):
                    break
            else:
                raise InvalidInput(f"too many photos named {stem} in {self.folder}")
            if not target.exists():  # (another process may take the name meanwhile: never over its file)
                target = write_new_file(target, lambda tmp: tmp.write_bytes(data))
        return self.open_photo(target)

    def _refuse_while_running(self) -> None:
        with self.lock:
            self._check_idle()

    def _open_session(self, photo: str | None):
        """The open photo's session; `photo` (what the page shows, if it says) must be it:
        a page in another tab may have opened another since, and its masks and learn
        would then be of the wrong photo (of the same size, nothing else would tell)."""
        session = self.session
        if session is None:
            with self.lock:
                if self.job and self.job.running and self.job.kind == "photo":
                    raise Busy("a photo is being opened: wait for it")
            raise InvalidInput("open a photo first")
        if photo is not None and str(photo) != str(session.image_path):
            raise OtherPhoto(f"another photo ({session.image_path.name}) was opened since, in another tab or window: "
                             "reload this page")
        return session

    def mask(self, object_id: str, points=(), labels=None, box=None, words=None, photo: str | None = None) -> dict:
        """One object's mask from its clicks, box or words (masks.session), on `photo`
        (the page's, checked) or the open one."""
        session = self._open_session(photo)
        object_id = str(object_id)[:64]
        points = [numbers(p, 2, "a click") for p in listed(points, "clicks")]
        if labels is not None and not all(type(v) is int for v in listed(labels, "labels")):
            raise InvalidInput("labels must be 1 (on the object) or 0 (beside it)")
        box = numbers(box, 4, "a box") if box is not None else None
        if words is not None and not isinstance(words, str):
            raise InvalidInput("words must be text")
        if words and session.detector is None and session.device.type != "cpu":
            with self.lock:
                if self.job and self.job.running and self.job.kind in ("learn", "generate"):
                    # Loading the detector now would take GPU memory a running learn planned with.
                    raise Busy(f"finding an object by words loads a detector onto {session.device.name}, which "
                               f"{self.job.kind} is using: click on the object, or wait for {self.job.kind} to end")
        with _photo_still_open():
            result = session.mask(f"object {object_id}", points, labels, box, words)
        with self.lock:
            if session is not self.session:  # another photo was opened meanwhile: this mask is of the old one
                raise OtherPhoto(PHOTO_REPLACED)
            self.masks.pop(object_id, None)  # (kept in the order last drawn)
            self.masks[object_id] = result
            while len(self.masks) > MAX_OBJECT_MASKS:  # each a full-size mask: the oldest drawn goes
                self.masks.pop(next(iter(self.masks)))
        return {"id": object_id, "score": result.score, "area": result.area, "box": list(result.box or ()),
                "png": png_base64(result.mask)}

    def save(self, objects: list[dict], out_dir=None, photo: str | None = None) -> dict:
        """The masks of `objects` ([{id, name}], in order) written as `mask` writes them:
        beside the photo, or in `out_dir` (an allowed folder)."""
        session = self._open_session(photo)
        results = []
        for item in listed(objects, "objects"):
            if not isinstance(item, dict):
                raise InvalidInput("each object must be {id, name}")
            key = str(item.get("id"))
            if key not in self.masks:
                raise InvalidInput(f"object {item.get('name') or key!r} has no mask yet: click on it first")
            label = str(item.get("name") or f"object {len(results) + 1}").strip()[:80]
            results.append(dataclasses.replace(self.masks[key], label=label, path=None))
        from ..masks.files import MaskInTheWay

        folder = self.confined(out_dir, "folder") if out_dir else self.out_dir
        if folder is not None and not is_writable_folder(folder):  # (the page's ways out, not --out-dir)
            raise InvalidInput(f"cannot write masks to {folder}: choose another folder (\"Save to folder\")")
        with _photo_still_open():
            try:
                return session.save(results, folder).to_dict()
            except MaskInTheWay as exc:  # the ways out the page has (no --out-dir, no --force)
                raise InvalidInput(f"{exc.path} {exc.why}: move it, or save to another folder "
                                   "(\"Save to folder\")") from None

    def learn(self, masks: list[str], settings: dict | None = None, name: str | None = None, base_model: str | None = None,
              resume: bool = False, force: bool = False, photo: str | None = None) -> dict:
        """`learn` on the open photo (`photo`, the page's, checked) and the saved masks, in
        the background; cancel saves a checkpoint that `resume` continues."""
        from ..train.learn import learn

        session = self._open_session(photo)
        if not all(isinstance(v, (str, type(None))) for v in (name, base_model, *listed(masks, "masks"))):
            raise InvalidInput("the masks, the scene name and the base model must be text")
        if not listed(masks, "masks"):
            raise InvalidInput("save the masks first: learn needs one mask per object")
        mask_paths = [self.confined(m, "mask") for m in masks]
        config = config_from(LearnConfig, settings).validate(len(mask_paths))  # a bad setting fails here, not in the job
        image = session.image_path
        base = (base_model or "").strip() or self.base_model

        def work(report, should_stop):
            return learn(image, mask_paths, config, name=(name or "").strip() or None, base_model=base,
                         device=self.device, resume=bool(resume), force=bool(force), report=report,
                         should_stop=should_stop).to_dict()

        return self._start("learn", work, cancellable=True)

    def generate(self, scene: str, prompt: str, settings: dict | None = None) -> dict:
        """`generate` one prompt with a scene (a cached name or an allowed path); the
        images go to the output folder (default: the photo's)."""
        from ..sample.generate import generate
        from ..scenes.bundle import read_metadata

        if not isinstance(prompt, str) or not isinstance(scene, (str, type(None))):
            raise InvalidInput("the scene and the prompt must be text")
        scene = (scene or "").strip()
        if not scene:
            raise InvalidInput("choose a scene")
        # A name is a cached scene's, never a file of that name in the current folder.
        ref = scene_path(scene) if valid_name(scene) and not scene.endswith(".scene") else self.confined(scene, "scene")
        read_metadata(resolve_scene(ref))  # a scene that is not there (or not a scene) fails here, not in the job
        config = config_from(GenerateConfig, settings).validate()
        out_dir = self.out_dir or self.folder

        def work(report, should_stop):
            return generate(ref, [prompt], config, out_dir=out_dir, device=self.device, report=report,
                            should_stop=should_stop).to_dict()

        return self._start("generate", work, cancellable=True)  # (stops after the images of the current pass)

    def cancel(self) -> dict:
        job = self.job
        if job is None or not job.running:
            raise InvalidInput("nothing is running")
        if not job.cancellable:
            raise InvalidInput(f"{job.kind} cannot be cancelled: it stops on its own")
        job.cancel()
        return job.summary()

    def stop_note(self) -> str:
        """What stopping the server now does to what runs, in a few words."""
        job = self.job
        if job is None or not job.running:
            return "scenebreak ui stopped"
        return f"scenebreak ui stopped{'; the running learn saves its checkpoint' if job.kind == 'learn' else ''}"

    def close(self, timeout: float | None = None) -> None:
        """Stop what runs (learn saves its checkpoint) and wait for what writes files,
        so that none is left half-written."""
        job = self.job
        if job is not None and job.running:
            job.closing = True
            job.cancel()
            if job.writes:
                # A learn still loading its model sees the stop only once loaded: say why nothing happens.
                self.echo(Message(f"stopping: waiting for the running {job.kind} to finish writing its files"
                                  + (" (learn saves its checkpoint first)" if job.kind == "learn" else "")))
                job.join(timeout)
