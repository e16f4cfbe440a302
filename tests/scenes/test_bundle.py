import json
import shutil
import struct

import pytest
import torch

from scenebreak import load_scene
from scenebreak.scenes.bundle import FORMAT_VERSION, read_metadata, save_scene
from scenebreak.errors import BundleError
from scenebreak.paths import resolve_scene, scene_path


def test_round_trip_keeps_everything(learned, tmp_path):
    scene = load_scene(learned.path, weights=True)
    copy = tmp_path / "copy.scene"
    save_scene(scene, copy, save_dtype="fp32")
    again = load_scene(copy, weights=True)
    assert again.meta["handles"] == scene.meta["handles"]
    assert again.meta["format_version"] == 1  # SD 1.x/2.x scenes stay format 1 (format 2 is SDXL)
    assert torch.equal(again.embeddings, scene.embeddings)
    assert (again.image == scene.image).all() and (again.masks == scene.masks).all()
    assert set(again.files) == set(scene.files) and any(k.startswith("tokenizer/") for k in again.files)
    for component in ("unet", "text_encoder", "vae"):
        assert again.weights[component].keys() == scene.weights[component].keys()
    assert not list(tmp_path.glob(".*tmp"))  # the temp file was renamed away


def test_a_scene_shows_itself_in_one_short_line(learned):
    """A notebook cell ending with a scene printed its tokenizer files' bytes (megabytes
    on SD 2.1), and with weights=True every state dict."""
    from scenebreak.scenes.bundle import load_scene

    shown = repr(load_scene(learned.path, weights=True))
    assert shown.startswith("Scene(name=") and "'<asset1>', '<asset2>'" in shown and "weights=loaded" in shown
    assert len(shown) < 300


def test_cache_names_resolve_to_the_scenes_folder(learned, tmp_path, monkeypatch):
    target = scene_path("mine")
    target.parent.mkdir(parents=True)
    shutil.copy(learned.path, target)
    assert resolve_scene("mine") == target
    assert load_scene("mine").tokens == ["<asset1>", "<asset2>"]
    assert resolve_scene(str(learned.path)) == learned.path
    (tmp_path / "cwd" / "mine").mkdir(parents=True)  # a folder of that name here is not the scene
    monkeypatch.chdir(tmp_path / "cwd")
    assert resolve_scene("mine") == target
    with pytest.raises(BundleError, match="scene not found"):
        load_scene("nothing-here")


def test_a_file_here_does_not_hide_the_cached_scene_and_rm_never_guesses(learned, tmp_path, monkeypatch):
    """`show NAME` with a file NAME in the current folder read that file ("not a readable
    .scene file") though `list` showed the cached scene; `rm NAME` with a scene copy NAME
    here deleted the copy and left the cached one. A bare name is the cached scene where
    there is one; a file alone is still taken; `rm` refuses a name that means both."""
    from click.testing import CliRunner

    from scenebreak.cli.commands import cli

    target = scene_path("both")
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(learned.path, target)
    here = tmp_path / "cwd"
    here.mkdir()
    monkeypatch.chdir(here)
    (here / "both").write_text("hi")
    shown = CliRunner().invoke(cli, ["show", "both"])
    assert shown.exit_code == 0 and str(target) in shown.stdout, shown.output
    shutil.copy(learned.path, here / "both")
    removed = CliRunner().invoke(cli, ["rm", "both"])
    assert removed.exit_code == 2 and "names both the cached scene" in removed.stderr, removed.output
    assert "./both" in removed.stderr and target.exists() and (here / "both").exists()
    shutil.copy(learned.path, here / "alone")  # no cached scene of that name: the file is meant
    assert str(resolve_scene("alone")) == "alone"
    assert CliRunner().invoke(cli, ["rm", "./both"]).exit_code == 0 and target.exists()
    assert CliRunner().invoke(cli, ["rm", "both"]).exit_code == 0 and not target.exists()


def test_a_scene_whose_path_is_not_utf8_opens(learned, tmp_path):
    """A name made under another locale (Latin-1 "lat\\xe9"): learn wrote the scene there,
    and every command then refused it as "truncated or corrupt" (safetensors opens only
    UTF-8 paths)."""
    import os

    folder = tmp_path / os.fsdecode(b"lat\xe9")
    try:
        folder.mkdir()
    except (OSError, UnicodeError):
        pytest.skip("this file system takes only UTF-8 names")
    shutil.copy(learned.path, folder / "photo.scene")
    scene = load_scene(folder / "photo.scene", weights=True)
    assert [h.token for h in scene.handles] == [h.token for h in load_scene(learned.path).handles]
    assert read_metadata(folder / "photo.scene") == read_metadata(learned.path)


def test_truncated_file_is_a_clear_error(learned, tmp_path):
    data = learned.path.read_bytes()
    for cut in (10, 1000, len(data) // 2, len(data) - 5):
        broken = tmp_path / f"cut{cut}.scene"
        broken.write_bytes(data[:cut])
        with pytest.raises(BundleError, match="truncated or corrupt|not a readable"):
            load_scene(broken, weights=True)


def test_foreign_safetensors_file_is_refused(tmp_path):
    from safetensors.torch import save_file

    save_file({"weight": torch.zeros(2)}, str(tmp_path / "lora.safetensors"), metadata={"format": "pt"})
    with pytest.raises(BundleError, match="not a scenebreak scene"):
        read_metadata(tmp_path / "lora.safetensors")
    (tmp_path / "photo.jpg.scene").write_bytes(b"\xff\xd8\xff\xe0" + b"0" * 100)
    with pytest.raises(BundleError):
        read_metadata(tmp_path / "photo.jpg.scene")


def _rewrite_header(src, dst, change):
    data = src.read_bytes()
    (size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + size])
    meta = json.loads(header["__metadata__"]["scenebreak"])
    change(meta)
    header["__metadata__"]["scenebreak"] = json.dumps(meta)
    encoded = json.dumps(header).encode()
    encoded += b" " * ((8 - len(encoded) % 8) % 8)
    dst.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data[8 + size:])


def test_newer_format_is_refused_with_upgrade_hint(learned, tmp_path):
    newer = tmp_path / "newer.scene"
    _rewrite_header(learned.path, newer, lambda m: m.update(format_version=FORMAT_VERSION + 1))
    with pytest.raises(BundleError, match="newer scenebreak.*upgrade"):
        load_scene(newer)
    same = tmp_path / "same.scene"
    _rewrite_header(learned.path, same, lambda m: None)
    assert load_scene(same).tokens == ["<asset1>", "<asset2>"]


def test_damaged_metadata_is_refused(learned, tmp_path):
    for label, change in {"no handles": lambda m: m.update(handles=[]),
                          "no base model": lambda m: m.pop("base_model"),
                          "bad resolution": lambda m: m.update(resolution="big")}.items():
        broken = tmp_path / "broken.scene"
        _rewrite_header(learned.path, broken, change)
        with pytest.raises(BundleError, match="damaged"):
            load_scene(broken)


def test_a_scene_replaced_between_its_two_reads_is_refused_not_mixed(learned, tmp_path):
    """`generate` reads a scene's handles and tokenizer first, its weights later: a scene
    written there meanwhile (another learn --force of that name) gave a mix of two."""
    import os

    from helpers import craft

    from scenebreak.device import choose_device
    from scenebreak.sample.scene_models import scene_components

    path = tmp_path / "s.scene"
    shutil.copy(learned.path, path)
    scene = load_scene(path)
    other = craft(learned.path, tmp_path / "other.scene", meta=lambda m: m.update(date="another run"))
    os.replace(other, path)
    with pytest.raises(BundleError, match="was replaced since it was opened"):
        scene_components(scene, choose_device("cpu"))
    assert scene_components(load_scene(path), choose_device("cpu"))  # read whole from one file: fine


def test_a_scene_windows_will_not_delete_is_said_to_be_in_use(tmp_path, monkeypatch):
    """On Windows, PermissionError from deleting a file mostly means another program has it
    open; "its folder is not writable by you" sent the user the wrong way."""
    import pathlib

    import scenebreak.scenes.catalog as catalog
    from scenebreak.errors import SceneBreakError

    scene = tmp_path / "x.scene"
    scene.write_bytes(b"x")
    def refused(self, missing_ok=False):
        raise PermissionError(13, "Access is denied")

    monkeypatch.setattr(pathlib.Path, "unlink", refused)
    monkeypatch.setattr(catalog, "ON_WINDOWS", True)
    with pytest.raises(SceneBreakError, match="it is in use .* close what uses it"):
        catalog.delete_file(scene)
    monkeypatch.setattr(catalog, "ON_WINDOWS", False)
    with pytest.raises(SceneBreakError, match="is not writable by you"):
        catalog.delete_file(scene)
