"""`evaluate` given damaged scoring models, as a careless download or a hostile folder
would give them: each is refused with one line that names the model and the fix, exit
code 1 (2 for a folder that is not a model at all), before any image is sampled, and
nothing is written."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from scenebreak.cli.commands import cli
from tinymodels import build_tiny_clip, build_tiny_dino, build_tiny_owlv2

ROLES = {"clip": ("--clip-model", "CLIP model"), "dino": ("--dino-model", "DINO model"),
         "detector": ("--detector", "detector"), "segmenter": ("--segmenter", "segmenter")}


@pytest.fixture(scope="module")
def good_models(tmp_path_factory, tiny_segmentation):
    root = tmp_path_factory.mktemp("scoring-models")
    detector, segmenter = tiny_segmentation
    return {"clip": build_tiny_clip(root / "clip"), "dino": build_tiny_dino(root / "dino"),
            "detector": Path(detector), "segmenter": Path(segmenter)}


def garbage(folder: Path) -> None:
    for path in folder.glob("*.safetensors"):
        path.write_bytes(b"not a safetensors file" * 10)


def cut_short(folder: Path) -> None:
    for path in folder.glob("*.safetensors"):
        data = path.read_bytes()
        path.write_bytes(data[:len(data) // 2])


def no_weights(folder: Path) -> None:
    for path in folder.glob("*.safetensors"):
        path.unlink()


def weights_folder(folder: Path) -> None:
    """model.safetensors is a folder."""
    for path in folder.glob("*.safetensors"):
        path.unlink()
        path.mkdir()


def no_processor(folder: Path) -> None:
    """Saved with the model's own save_pretrained alone."""
    for name in ("preprocessor_config.json", "processor_config.json"):
        (folder / name).unlink(missing_ok=True)


def pickled_cut_short(folder: Path) -> None:
    """Weights in torch's own format (DINO ViT-S/16's only file), cut short."""
    import torch
    from safetensors.torch import load_file

    for path in folder.glob("*.safetensors"):
        torch.save(load_file(path), folder / "pytorch_model.bin")
        path.unlink()
        data = (folder / "pytorch_model.bin").read_bytes()
        (folder / "pytorch_model.bin").write_bytes(data[:len(data) // 2])


def config_garbage(folder: Path) -> None:
    (folder / "config.json").write_text("{ not json")


def wider_config(folder: Path) -> None:
    """config.json says 8 more hidden units than the weights have (another model's config)."""
    import json

    config = json.loads((folder / "config.json").read_text())
    for part in (config, config.get("text_config", {}), config.get("vision_config", {})):
        if "hidden_size" in part:
            part["hidden_size"] += 8
    (folder / "config.json").write_text(json.dumps(config))


# (id, role, damage, exit code, phrases of the one line)
CASES = [
    ("clip-garbage", "clip", garbage, 1, ["CLIP model", "model.safetensors is damaged", "Fix:", "--clip-model"]),
    ("dino-garbage", "dino", garbage, 1, ["DINO model", "model.safetensors is damaged", "Fix:", "--dino-model"]),
    ("detector-garbage", "detector", garbage, 1, ["detector", "model.safetensors is damaged", "Fix:", "--detector"]),
    ("segmenter-garbage", "segmenter", garbage, 1, ["segmenter", "model.safetensors is damaged", "Fix:", "--segmenter"]),
    ("clip-cut-short", "clip", cut_short, 1, ["CLIP model", "model.safetensors is damaged", "Fix:"]),
    ("dino-cut-short", "dino", cut_short, 1, ["DINO model", "model.safetensors is damaged", "Fix:"]),
    ("detector-no-weights", "detector", no_weights, 1, ["detector", "no weights file", "Fix:"]),
    ("segmenter-weights-folder", "segmenter", weights_folder, 1, ["segmenter", "model.safetensors is damaged", "Fix:"]),
    ("clip-no-processor", "clip", no_processor, 1, ["CLIP model", "no image processor settings", "Fix:"]),
    ("dino-no-processor", "dino", no_processor, 1, ["DINO model", "save the processor there too", "Fix:"]),
    ("segmenter-no-processor", "segmenter", no_processor, 1, ["segmenter", "no image processor settings", "Fix:"]),
    ("dino-pickled-cut-short", "dino", pickled_cut_short, 1, ["DINO model", "pytorch_model.bin is damaged", "Fix:"]),
    ("clip-config-garbage", "clip", config_garbage, 2, ["--clip-model", "CLIP checkpoint"]),
    ("clip-wider-config", "clip", wider_config, 1, ["CLIP model", "weights do not fit its config.json", "Fix:"]),
    ("dino-wider-config", "dino", wider_config, 1, ["DINO model", "weights do not fit its config.json", "Fix:"]),
]


def _snapshot(root: Path) -> dict:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_damaged_scoring_model_is_one_line_before_any_image(case, learned, good_models, tmp_path, monkeypatch):
    _, role, damage, code, phrases = case
    damaged = tmp_path / f"damaged-{role}"
    shutil.copytree(good_models[role], damaged)
    damage(damaged)
    models = {**good_models, role: damaged}
    args = ["evaluate", learned.path, "--steps", "1", "--scheduler", "ddim", "--out-dir", tmp_path / "eval"]
    for key, (option, _) in ROLES.items():
        args += [option, models[key]]
    monkeypatch.chdir(tmp_path)
    before = _snapshot(tmp_path)
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == code, (result.exit_code, result.output)
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and all(p in errors[0] for p in phrases), result.stderr
    if code == 1:
        assert str(damaged) in errors[0] and "copy the model there again" in errors[0]
    assert "Traceback" not in result.output and result.stdout == ""
    assert not (tmp_path / "eval").exists()  # told before the sampling
    assert _snapshot(tmp_path) == before


@pytest.mark.parametrize("role", list(ROLES))
def test_each_loader_names_the_model_and_the_fix(role, good_models, tmp_path):
    """Past the check (a folder damaged after it, or the library used directly), loading
    itself gives the same one line: safetensors' own error is neither OSError nor
    ValueError, and used to escape as a bare "SafetensorError: header too large"."""
    from scenebreak.masks.detector import Detector
    from scenebreak.device import choose_device
    from scenebreak.errors import ModelNotAvailable
    from scenebreak.evaluation.metrics import ClipScorer, DinoScorer
    from scenebreak.masks.segmenter import Segmenter

    loader = {"clip": ClipScorer, "dino": DinoScorer, "detector": Detector, "segmenter": Segmenter}[role]
    option, what = ROLES[role]
    damaged = tmp_path / role
    shutil.copytree(good_models[role], damaged)
    garbage(damaged)
    with pytest.raises(ModelNotAvailable) as caught:
        loader(str(damaged), choose_device("cpu"))
    message = str(caught.value)
    assert message.startswith(f"cannot load the {what} from {damaged}: ") and "\n" not in message
    assert f"Fix: copy the model there again or pass {option} " in message


def test_whole_weights_in_torchs_own_format_pass_the_check(good_models, tmp_path):
    """DINO ViT-S/16 ships only pytorch_model.bin: the check must take a whole one, in
    torch's zip format or its format from before 1.6, and load it after."""
    import torch
    from safetensors.torch import load_file

    from scenebreak.device import choose_device
    from scenebreak.evaluation.metrics import DinoScorer, _check_weights

    for zipped in (True, False):
        folder = tmp_path / f"zipped-{zipped}"
        shutil.copytree(good_models["dino"], folder)
        torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin",
                   _use_new_zipfile_serialization=zipped)
        (folder / "model.safetensors").unlink()
        _check_weights(folder, "DINO model", str(folder), "--dino-model")
        DinoScorer(str(folder), choose_device("cpu"))


def _args(learned, models, tmp_path, *more):
    args = ["evaluate", learned.path, "--steps", "1", "--out-dir", tmp_path / "eval", *more]
    for key, (option, _) in ROLES.items():
        args += [option, models[key]]
    return [str(a) for a in args]


@pytest.mark.parametrize("more, phrase", [
    (["--scheduler", "flow"], "--scheduler flow: SD 2.x samples with"),
    (["--negative", "<asset9>"], "<asset9>"),
    (["--precision", "fp16"], "fp16"),
])
def test_bad_sampling_options_are_said_before_the_scoring_models_are_fetched(more, phrase, learned, good_models,
                                                                              tmp_path, monkeypatch):
    """They were checked after the four scoring models: a typo cost gigabytes of
    downloads, and offline it was an exit 1 that blamed the models."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    missing = {key: "nobody/no-such-model" for key in ROLES}  # (not in the cache: fetching them would fail)
    result = CliRunner().invoke(cli, _args(learned, missing, tmp_path, *more))
    assert result.exit_code == 2, result.output
    assert phrase in result.stderr and "no-such-model" not in result.stderr, result.stderr
    assert not (tmp_path / "eval").exists()


def test_a_class_word_too_long_for_an_owl_detector_is_said_before_any_image(learned, good_models, tmp_path):
    """OWL reads 16 tokens: a longer --words entry failed when the first image was
    scored, after the sampling, and the line named `mask`'s -p."""
    models = {**good_models, "detector": build_tiny_owlv2(tmp_path / "owl")}
    long = " ".join(["red"] * 20)
    result = CliRunner().invoke(cli, _args(learned, models, tmp_path, "--scheduler", "ddim", "--words", long, "bowl"))
    assert result.exit_code == 2, result.output
    assert result.stderr.strip().splitlines()[-1] == (f"Error: --words {long!r} is 22 tokens long; this OWL detector "
                                                      "reads at most 16: describe the object in fewer words")
    assert not (tmp_path / "eval").exists()
