"""`scenebreak mask` on tiny random Grounding DINO and SAM models (see
`build_tiny_segmentation_models` in tests/tinymodels.py). Random weights make scores and
labels meaningless, so these tests check the mechanics: files, sizes, binary values,
stdout, exit codes."""

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from scenebreak.cli.commands import cli
from tinymodels import build_tiny_owlv2
from scenebreak.errors import InvalidInput
from scenebreak.config import MaskConfig
from scenebreak.masks.masking import make_masks, parse_box, parse_point
from scenebreak.masks.ops import dilate


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture
def models(tiny_segmentation):
    detector, segmenter = tiny_segmentation
    return ["--detector", detector, "--segmenter", segmenter]


def error_lines(result):
    return [line for line in result.stderr.splitlines() if line.startswith("Error")]


def written(folder):
    """The mask files and previews in `folder` (not the hidden record of what mask wrote)."""
    return sorted(p.name for p in folder.iterdir() if ".mask" in p.name and not p.name.startswith("."))


def check_mask_file(path, size):
    image = Image.open(path)
    assert image.size == size and image.mode == "L"
    values = set(np.unique(np.asarray(image)).tolist())
    assert values <= {0, 255} and 255 in values


def test_parse_points_and_boxes():
    assert parse_point("12,34.5") == (12.0, 34.5)
    assert parse_point(" 3 , 4 ") == (3.0, 4.0)
    assert parse_box("1,2,30,40") == (1.0, 2.0, 30.0, 40.0)
    for bad in ("12", "1,2,3", "a,b", "nan,1", ""):
        with pytest.raises(InvalidInput, match="X,Y"):
            parse_point(bad)
    for bad in ("1,2,3", "1,2,3,4,5", "x,1,2,3"):
        with pytest.raises(InvalidInput, match="X0,Y0,X1,Y1"):
            parse_box(bad)
    for flipped in ("30,2,1,40", "1,40,30,2", "5,5,5,9"):
        with pytest.raises(InvalidInput, match="X0 < X1 and Y0 < Y1"):
            parse_box(flipped)


def test_library_makes_one_clean_mask_per_prompt_box_and_point(scene_files, tiny_segmentation, tmp_path):
    detector, segmenter = tiny_segmentation
    events = []
    config = MaskConfig(detector=str(detector), segmenter=str(segmenter), threshold=0.0)
    result = make_masks(scene_files["image"], prompts=["red square", "bowl"], boxes=[(12, 8, 44, 40)],
                        points=[(20, 20), (60, 60)], config=config, out_dir=tmp_path / "out", report=events.append)
    assert [m.label for m in result.masks] == ["red square", "bowl", "box 1", "point 1", "point 2"]
    assert [m.source for m in result.masks] == ["prompt", "prompt", "box", "point", "point"]
    assert [p.name for p in result.paths] == [f"photo.mask{i}.png" for i in range(1, 6)]
    for item in result.masks:
        check_mask_file(item.path, (96, 80))
        assert item.area == int(item.mask.sum()) > 0 and len(item.box) == 4
    assert result.preview.name == "photo.masks-preview.png" and Image.open(result.preview).size == (96, 80)
    texts = [getattr(e, "text", "") for e in events]
    assert any("loading detector" in t for t in texts) and any("loading segmenter" in t for t in texts)
    assert any(getattr(e, "task", "") == "segmenting" for e in events)
    data = result.to_dict()
    assert {"path", "label", "score", "box", "area", "source"} <= set(data["masks"][0])


def test_cli_prints_only_paths_beside_the_image(scene_files, models):
    image = scene_files["image"]
    result = run("mask", image, "-p", "red square", "--box", "52,42,84,74", "--point", "20,20", "--threshold", "0", *models)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines == [str(image.parent / f"photo.mask{i}.png") for i in (1, 2, 3)]
    for line in lines:
        check_mask_file(line, (96, 80))
    assert (image.parent / "photo.masks-preview.png").exists()
    assert "loading segmenter" in result.stderr and "preview:" in result.stderr


def test_cli_json_group_all_instances_dilate_and_stale_masks(scene_files, models, tmp_path):
    out = tmp_path / "masks"
    args = ["mask", scene_files["image"], "--out-dir", out, "--threshold", "0", *models]
    result = run(*args, "-p", "bowl", "--all-instances", "--point", "20,20", "--point", "30,30", "--group", "--json", "-q")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert [m["label"] for m in data["masks"]] == ["bowl", "points"]
    assert all(os.path.exists(m["path"]) and m["area"] > 0 and len(m["box"]) == 4 for m in data["masks"])
    assert data["preview"].endswith("photo.masks-preview.png")
    assert data["paths"] == [m["path"] for m in data["masks"]]  # what the plain output lists, as in every command
    assert "loading" not in result.stderr and "preview:" not in result.stderr  # -q: only warnings (e.g. overlaps)

    plain = run(*args, "--box", "12,8,44,40", "--keep-holes", "--min-area", "1", "-q")
    grown = run(*args, "--box", "12,8,44,40", "--dilate", "3", "--keep-holes", "--min-area", "1", "-q", "--out-dir", tmp_path / "g")
    assert plain.exit_code == 0 and grown.exit_code == 0, grown.output
    plain_mask = np.asarray(Image.open(plain.stdout.strip())) > 0
    assert np.array_equal(np.asarray(Image.open(grown.stdout.strip())) > 0, dilate(plain_mask, 3).astype(bool))
    # the re-run wrote one mask: the earlier run's mask2 is gone, so `photo.mask*.png` is this run's
    assert written(out) == ["photo.mask1.png", "photo.masks-preview.png"]


def test_keep_holes_and_min_area_reach_the_clean_up_as_asked(scene_files, models, tmp_path, monkeypatch):
    """Each clean-up option does what its --help says to a ring with a speck beside it."""
    import scenebreak.masks.masking as masking
    from scenebreak.config import MaskConfig

    ring = np.zeros((80, 96), np.uint8)
    ring[10:50, 10:50] = 1
    ring[28:32, 28:32] = 0  # a hole of 16 pixels
    ring[70:72, 80:82] = 1  # a speck of 4
    cleaned = {key: masking.cleaned_result("x", "box", 1.0, ring, min_area, MaskConfig(**options)).mask
               for key, (min_area, options) in {"default": (1, {}), "holes": (1, {"fill_holes": False}),
                                                "specks": (10, {}), "grown": (1, {"dilate": 2})}.items()}
    assert cleaned["default"][30, 30] and not cleaned["holes"][30, 30]  # --keep-holes keeps the hole
    assert cleaned["default"][71, 81] and not cleaned["specks"][71, 81]  # --min-area drops the speck
    assert np.array_equal(cleaned["grown"] > 0, dilate(cleaned["default"], 2).astype(bool))  # --dilate grows it
    # ... and the command line's options reach it: --min-area as pixels, --keep-holes as fill_holes.
    asked = []
    real = masking.maskops.clean
    monkeypatch.setattr(masking.maskops, "clean", lambda mask, min_area, fill=True, grow=0, keep_at=(): (
        asked.append((min_area, fill, grow)), real(mask, min_area, fill, grow, keep_at))[1])
    result = run("mask", scene_files["image"], "--box", "12,8,44,40", "--keep-holes", "--min-area", "7",
                 "--dilate", "2", "--out-dir", tmp_path, "-q", *models)
    assert result.exit_code == 0, result.output
    assert asked == [(7, False, 2)]


def test_cli_auto_keeps_at_most_max_masks(scene_files, models, tmp_path):
    result = run("mask", scene_files["image"], "--auto", "--max-masks", "2", "--out-dir", tmp_path, "--json", *models)
    assert result.exit_code == 0, result.output
    masks = json.loads(result.stdout)["masks"]
    assert 1 <= len(masks) <= 2 and all(m["source"] == "auto" for m in masks)
    assert [m["area"] for m in masks] == sorted((m["area"] for m in masks), reverse=True)
    for item in masks:
        check_mask_file(item["path"], (96, 80))


def test_points_follow_the_exif_orientation(tmp_path, models):
    """A phone photo stored sideways: coordinates and masks are as a viewer shows it."""
    stored = Image.new("RGB", (40, 60), (200, 200, 200))
    exif = stored.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to view
    stored.save(tmp_path / "phone.jpg", exif=exif)
    result = run("mask", tmp_path / "phone.jpg", "--point", "55,35", *models)  # x=55 exists only when rotated
    assert result.exit_code == 0, result.output
    assert Image.open(result.stdout.strip()).size == (60, 40)


def test_bad_input_is_exit_2_with_one_line_and_nothing_written(scene_files, models, tmp_path):
    image = scene_files["image"]
    (tmp_path / "notes.txt").write_text("not an image")
    cases = {
        "unmatched prompt": ([image, "-p", "ceramic creature", "--threshold", "1"], "'ceramic creature'"),
        "point outside": ([image, "--point", "96,10"], "outside the image"),
        "box outside": ([image, "--box", "0,0,97,40"], "outside the image"),
        "bad point": ([image, "--point", "1,2,3"], "X,Y"),
        "flipped box": ([image, "--box", "40,0,10,30"], "X0 < X1"),
        "nothing asked": ([image], "--prompt"),
        "unreadable image": ([tmp_path / "notes.txt", "--auto"], "cannot read image"),
        "missing image": ([tmp_path / "nope.jpg", "--auto"], "not found"),
        "bad threshold": ([image, "-p", "cat", "--threshold", "2"], "threshold"),
    }
    before = written(image.parent)
    for label, (args, expected) in cases.items():
        result = run("mask", *args, *models)
        assert result.exit_code == 2, (label, result.output)
        assert expected in result.output, (label, result.output)
        assert result.stdout == "" and "Traceback" not in result.output, label
        assert len(error_lines(result)) == 1, (label, result.stderr)
    unmatched = run("mask", image, "-p", "bowl", "--threshold", "1", *models)
    assert "--threshold" in unmatched.stderr and "--point" in unmatched.stderr and "--box" in unmatched.stderr
    assert written(image.parent) == before  # nothing half-written


def test_absent_weights_offline_are_exit_1_with_the_fix(scene_files, tiny_segmentation):
    detector, segmenter = tiny_segmentation
    result = run("mask", scene_files["image"], "--box", "1,1,20,20", "--segmenter", "someone/absent-sam")
    assert result.exit_code == 1 and len(error_lines(result)) == 1
    assert "segmenter 'someone/absent-sam' is not available" in result.stderr
    assert "hf download someone/absent-sam" in result.stderr and "--segmenter" in result.stderr
    result = run("mask", scene_files["image"], "-p", "cat", "--detector", "someone/absent-dino", "--segmenter", segmenter)
    assert result.exit_code == 1 and "hf download someone/absent-dino" in result.stderr and "--detector" in result.stderr
    result = run("mask", scene_files["image"], "-p", "cat", "--detector", segmenter, "--segmenter", segmenter)
    assert result.exit_code == 2 and "Grounding DINO" in result.stderr  # a SAM folder is not a detector
    assert not list(scene_files["image"].parent.glob("photo.mask*"))


def test_mask_output_pipes_into_learn(scene_files, tiny_segmentation, tiny_model, tmp_path):
    """The documented one-liner, in a real shell: learn --masks $(scenebreak mask ...)."""
    _, segmenter = tiny_segmentation
    scenebreak = f"{sys.executable} -m scenebreak"
    image = scene_files["image"]
    line = (f"{scenebreak} learn {image} --masks $({scenebreak} mask {image} --box 12,8,44,40 --point 68,58 "
            f"--segmenter {segmenter} -q) --base-model {tiny_model} --steps1 1 --steps2 1 --no-prior -q --json")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(["bash", "-c", line], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    scene = json.loads(done.stdout)
    assert scene["handles"] == ["<asset1>", "<asset2>"]
    assert os.path.exists(scene["path"])


def test_sam_prompts_reach_the_model_in_float32(tiny_segmentation, scene_files):
    """SAM's processor gives prompt coordinates in float64, which Apple's GPU (MPS) cannot
    hold (a TypeError on .to("mps")): every prompt tensor goes over as float32."""
    import torch

    from scenebreak.device import choose_device
    from scenebreak.images import load_image
    from scenebreak.masks.segmenter import Segmenter

    segmenter = Segmenter(str(tiny_segmentation[1]), choose_device("cpu"))
    segmenter.set_image(load_image(scene_files["image"]))
    real, dtypes = segmenter.model, set()

    def spy(**inputs):
        dtypes.update(v.dtype for k, v in inputs.items() if k.startswith("input_"))
        return real(**inputs)

    segmenter.model = spy
    segmenter.from_boxes([[2, 2, 40, 40]])
    segmenter.from_points([(10, 10), (30, 30)], together=True)
    segmenter.automatic(grid=2, limit=1)
    assert torch.float64 not in dtypes and torch.float32 in dtypes


def test_auto_keeps_distinct_stable_segments_largest_first(tiny_segmentation, scene_files):
    """--auto's selection on a scripted SAM: every click proposes its region (A or B),
    the whole image, and an unstable blur; the result is B then A, each once."""
    import torch
    from types import SimpleNamespace

    from scenebreak.device import choose_device
    from scenebreak.images import load_image
    from scenebreak.masks.segmenter import Segmenter

    segmenter = Segmenter(str(tiny_segmentation[1]), choose_device("cpu"))
    segmenter.set_image(load_image(scene_files["image"]))
    region_a = (slice(2, 12), slice(2, 14))  # low-res (32 x 32) rows, columns
    region_b = (slice(14, 26), slice(16, 30))

    def scripted(image_embeddings, input_points, input_labels, multimask_output):
        count = input_points.shape[1]
        logits = torch.full((1, count, 3, 32, 32), -10.0)
        for i in range(count):
            x, y = (input_points[0, i, 0] / 4).tolist()
            region = region_a if region_a[0].start <= y < region_a[0].stop and region_a[1].start <= x < region_a[1].stop else region_b
            logits[0, i, 0][region] = 10.0
            logits[0, i, 1] = 10.0  # the whole image: background
            logits[0, i, 2] = torch.linspace(-0.5, 0.5, 32)  # unstable
        return SimpleNamespace(pred_masks=logits, iou_scores=torch.full((1, count, 3), 0.95))

    segmenter.model = scripted
    segments = segmenter.automatic(grid=8, limit=5)
    assert len(segments) == 2
    (big, big_score), (small, small_score) = segments
    assert big.sum() > small.sum() > 0 and not (big & small).any()
    assert big_score == small_score == pytest.approx(0.95)
    ys, xs = np.nonzero(small)
    assert xs.min() < 15 and ys.min() < 15  # region A is the top-left one
    assert segmenter.automatic(grid=8, limit=1)[0][0].sum() == big.sum()


def test_mask_help_has_an_example():
    result = run("mask", "--help")
    assert result.exit_code == 0 and "Example" in result.output and "$(scenebreak mask" in result.output


def test_owlv2_detector_works_or_names_its_missing_extra(scene_files, tiny_segmentation, tmp_path):
    """OWLv2 post-processing needs scipy: without it, one line that says how to add it."""
    folder = build_tiny_owlv2(tmp_path / "tiny-owlv2")
    result = run("mask", scene_files["image"], "-p", "red square", "--threshold", "0", "--detector", folder,
                 "--segmenter", tiny_segmentation[1])
    try:
        import scipy  # noqa: F401
    except ImportError:
        assert result.exit_code == 1 and "needs scipy" in result.stderr and "pipx inject scenebreak scipy" in result.stderr
        assert len(error_lines(result)) == 1
        assert "loading segmenter" not in result.stderr  # (said before the segmenter's work on the photo)
    else:
        assert result.exit_code == 0, result.output


def test_the_default_threshold_is_the_detector_kinds(tiny_segmentation, tmp_path, monkeypatch):
    """OWL's scores run lower than Grounding DINO's: without --threshold a match must pass
    0.1 with OWL (transformers' own default for it), 0.3 with Grounding DINO."""
    from scenebreak.device import choose_device
    from scenebreak.masks.detector import Detector

    cpu = choose_device("cpu")
    monkeypatch.setitem(sys.modules, "scipy", sys.modules.get("scipy") or types.ModuleType("scipy"))  # (OWLv2 needs it)
    owl, dino = Detector(str(build_tiny_owlv2(tmp_path / "owl")), cpu), Detector(str(tiny_segmentation[0]), cpu)
    assert (owl.kind, owl.threshold(None), owl.threshold(0.5)) == ("owlv2", 0.1, 0.5)
    assert (dino.kind, dino.threshold(None), dino.threshold(0.0)) == ("grounding-dino", 0.3, 0.0)
    assert MaskConfig().threshold is None


def test_nothing_above_the_default_threshold_names_it(scene_files, models, monkeypatch):
    """The message names the threshold that applied, the kind's default when none was given."""
    from scenebreak.masks.detector import Detector

    monkeypatch.setattr(Detector, "detect", lambda self, image, prompt: (np.zeros((1, 4)), np.array([0.2])))
    result = run("mask", scene_files["image"], "-p", "cup", *models)
    assert result.exit_code == 2 and "nothing matches 'cup' (best score 0.20) above --threshold 0.3" in result.stderr, result.output


def test_helper_models_stored_in_half_precision_run_in_fp32(scene_files, tiny_segmentation, tmp_path):
    """transformers 5 loads a model in its files' dtype, 4 in fp32: a SAM or detector
    checkpoint saved in fp16 ran in fp16 under 5 (on the CPU: errors or a crawl); the
    helper models are loaded in fp32 whatever the files and the version."""
    import shutil

    import torch
    from transformers import GroundingDinoForObjectDetection, SamModel

    from scenebreak.device import choose_device
    from scenebreak.masks.detector import Detector
    from scenebreak.masks.segmenter import Segmenter

    detector, segmenter = (shutil.copytree(path, tmp_path / path.name) for path in tiny_segmentation)
    SamModel.from_pretrained(segmenter).half().save_pretrained(segmenter)
    GroundingDinoForObjectDetection.from_pretrained(detector).half().save_pretrained(detector)
    cpu = choose_device("cpu")
    assert Segmenter(str(segmenter), cpu).model.dtype == torch.float32
    assert Detector(str(detector), cpu).model.dtype == torch.float32
    result = run("mask", scene_files["image"], "-p", "red square", "--threshold", "0", "--detector", detector,
                 "--segmenter", segmenter, "--out-dir", tmp_path / "out")
    assert result.exit_code == 0, result.output


def test_every_prompt_that_matches_nothing_is_named_in_one_line(scene_files, models, monkeypatch):
    """All prompts are tried before the run stops: the first miss alone was named, and the
    user ran the detector again once per word."""
    from scenebreak.masks.detector import Detector

    scores = {"cup": 0.2, "bowl": 0.9, "lid": 0.05}
    monkeypatch.setattr(Detector, "detect", lambda self, image, prompt: (np.array([[10.0, 10, 40, 40]]),
                                                                         np.array([scores[prompt]])))
    result = run("mask", scene_files["image"], "-p", "cup", "-p", "bowl", "-p", "lid", *models)
    assert result.exit_code == 2 and len(error_lines(result)) == 1, result.output
    assert ("nothing matches 'cup' (best score 0.20), 'lid' (best score 0.05) above --threshold 0.3"
            in result.stderr), result.stderr


@pytest.mark.parametrize("prompt", ["cat. dog", "red cup. blue bowl.", "cat.dog", "st.bernard dog", "cat?dog"])
def test_a_prompt_of_several_phrases_is_refused_before_any_model_loads(scene_files, prompt):
    """Grounding DINO reads every '.' and '?' as the end of a phrase (its BERT tokenizer
    splits 'cat.dog' as 'cat. dog'): 'cat. dog' became one mask of whichever scored best
    (both with --all-instances)."""
    result = run("mask", scene_files["image"], "-p", prompt, "--detector", "someone/absent-dino",
                 "--segmenter", "someone/absent-sam")
    assert result.exit_code == 2 and "one object per --prompt" in result.stderr, result.output
    assert "absent" not in result.stderr  # (no model was looked for)
    assert run("mask", scene_files["image"], "-p", "st bernard dog.", "--detector", "someone/absent-dino",
               "--segmenter", "someone/absent-sam").exit_code == 1  # (one phrase: only the models are missing)


@pytest.mark.parametrize("prompt", [".", ". .", "?"])
def test_a_prompt_of_marks_alone_is_refused(scene_files, prompt):
    result = run("mask", scene_files["image"], "-p", prompt, "--detector", "someone/absent-dino",
                 "--segmenter", "someone/absent-sam")
    assert result.exit_code == 2 and "names no object" in result.stderr, result.output


def test_json_says_the_threshold_and_the_boxes_a_prompt_mask_came_from(scene_files, models, tmp_path, monkeypatch):
    from scenebreak.masks.detector import Detector

    boxes = np.array([[10.0, 8, 44, 40], [50, 50, 60, 60]])
    monkeypatch.setattr(Detector, "detect", lambda self, image, prompt: (boxes, np.array([0.9, 0.2])))
    result = run("mask", scene_files["image"], "-p", "bowl", "--box", "12,8,44,40", "--json", "-q",
                 "--out-dir", tmp_path, *models)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["threshold"] == 0.3  # Grounding DINO's default: the one that applied
    assert data["masks"][0]["detections"] == [[10.0, 8.0, 44.0, 40.0]]  # the best match only (no --all-instances)
    assert data["masks"][1]["detections"] is None  # (a box mask: no detector)
    result = run("mask", scene_files["image"], "--box", "12,8,44,40", "--json", "-q", "--out-dir", tmp_path / "b",
                 *models)
    assert json.loads(result.stdout)["threshold"] is None


def test_an_owl_prompt_longer_than_it_reads_is_one_line(scene_files, tiny_segmentation, tmp_path):
    """OWL's text tower reads 16 tokens and its processor pads to them without cutting:
    a longer prompt failed inside the model with a shape error."""
    folder = build_tiny_owlv2(tmp_path / "owl")
    words = " ".join(["red", "square"] * 10)
    result = run("mask", scene_files["image"], "-p", words, "--detector", folder, "--segmenter", tiny_segmentation[1])
    assert result.exit_code == 2 and len(error_lines(result)) == 1, result.output
    assert "tokens long; this OWL detector reads at most 16" in result.stderr


def test_mm_grounding_dino_is_a_detector_too(scene_files, tiny_segmentation, tmp_path):
    """MM-Grounding-DINO (Grounding DINO's architecture, retrained) is read by the same
    processor and post-processing: accepted as --detector, with Grounding DINO's default
    threshold; a transformers too old for it says so in one line."""
    import shutil

    import transformers

    from scenebreak.device import choose_device
    from scenebreak.masks.detector import Detector
    from tinymodels import build_tiny_mm_grounding_dino

    if not hasattr(transformers, "MMGroundingDinoForObjectDetection"):  # (the floors pass: transformers 4.49)
        folder = shutil.copytree(tiny_segmentation[0], tmp_path / "mm-gd")
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps(dict(config, model_type="mm-grounding-dino")))
        result = run("mask", scene_files["image"], "-p", "red square", "--detector", folder,
                     "--segmenter", tiny_segmentation[1], "--out-dir", tmp_path / "out")
        assert result.exit_code == 1 and len(error_lines(result)) == 1, result.output
        assert f"transformers {transformers.__version__} cannot run: upgrade it" in result.stderr
        return
    folder = build_tiny_mm_grounding_dino(tmp_path / "mm-gd", tiny_segmentation[0])
    detector = Detector(str(folder), choose_device("cpu"))
    assert (detector.kind, detector.threshold(None)) == ("mm-grounding-dino", 0.3)
    result = run("mask", scene_files["image"], "-p", "red square", "--threshold", "0", "--detector", folder,
                 "--segmenter", tiny_segmentation[1], "--out-dir", tmp_path / "out")
    assert result.exit_code == 0, result.output


def test_every_missing_model_is_named_in_one_line(scene_files):
    result = run("mask", scene_files["image"], "-p", "cat", "--detector", "someone/absent-dino", "--segmenter", "someone/absent-sam")
    assert result.exit_code == 1 and len(error_lines(result)) == 1
    assert "hf download someone/absent-dino" in result.stderr and "hf download someone/absent-sam" in result.stderr
    assert "loading" not in result.stderr  # found out before loading anything


def test_cli_exclude_takes_a_spot_out_of_one_objects_clicks(scene_files, models, tmp_path):
    image = scene_files["image"]
    args = ["mask", image, "--point", "20,20", "-q", *models]
    plain = run(*args, "--out-dir", tmp_path / "plain")
    beside = run(*args, "--exclude", "30,30", "--out-dir", tmp_path / "beside")
    assert plain.exit_code == 0 and beside.exit_code == 0, beside.output
    assert [os.path.basename(p) for p in beside.stdout.split()] == ["photo.mask1.png"]
    check_mask_file(beside.stdout.strip(), (96, 80))
    # SAM gets the click beside the object too: another prompt, another mask.
    assert not np.array_equal(np.asarray(Image.open(plain.stdout.strip())), np.asarray(Image.open(beside.stdout.strip())))
    for extra, message in ((["--exclude", "30,30", "--point", "60,60"], "add --group"),
                           (["--exclude", "500,30"], "outside the image")):
        result = run(*args, *extra, "--out-dir", tmp_path / "bad")
        assert result.exit_code == 2 and message in error_lines(result)[0], result.output
    result = run("mask", image, "--exclude", "30,30", "-p", "bowl", *models)
    assert result.exit_code == 2 and "click on the object with --point too" in result.stderr
    assert not (tmp_path / "bad").exists()


def test_all_instances_merges_the_best_matches_only_one_at_a_time():
    """At --threshold 0 every one of Grounding DINO's 900 queries is above it: each went to
    SAM as a full-size mask and all were stacked at once (tens of GB for a 12 MP photo)."""
    import numpy as np

    from scenebreak.config import MaskConfig
    from scenebreak.masks.masking import MAX_INSTANCES, find_object

    class Detector:
        def detect(self, image, prompt):
            boxes = np.array([[i % 50, 0, i % 50 + 2, 2] for i in range(900)], float)
            return boxes, np.linspace(0.9, 0.01, 900)

        def threshold(self, asked):
            return asked

    class Segmenter:
        asked = 0

        def from_boxes(self, boxes):
            Segmenter.asked = len(boxes)
            for x0, *_ in boxes:
                mask = np.zeros((4, 60), np.float32)
                mask[0, int(x0)] = 1
                yield mask, 1.0

    score, mask, detections = find_object(Detector(), Segmenter(), None, "cat",
                                          MaskConfig(all_instances=True, threshold=0.0))
    assert Segmenter.asked == MAX_INSTANCES == 16 == len(detections) and score == 0.9
    assert sorted(np.nonzero(mask[0])[0]) == list(range(16))


def test_a_mask_over_most_of_the_photo_is_warned_about(tmp_path):
    """SAM may take the surroundings, and the hole filling then closes them over the
    object: a mask of (nearly) the whole photo was written without a word."""
    import numpy as np
    from PIL import Image

    from scenebreak.events import Message
    from scenebreak.masks.files import MaskResult
    from scenebreak.masks.masking import write_run

    image = Image.new("RGB", (40, 30))
    full, part = np.ones((30, 40), np.uint8), np.zeros((30, 40), np.uint8)
    part[5:15, 5:15] = 1
    messages = []
    write_run(tmp_path / "p.png", image, [MaskResult("cat", "prompt", 0.9, full), MaskResult("bowl", "box", 0.9, part)],
              tmp_path, messages.append)
    warnings = [m.text for m in messages if isinstance(m, Message) and m.level == "warning" and "covers" in m.text]
    assert warnings == ["mask 1 (cat) covers 100% of the photo: likely not the object alone; check the preview, or give "
                        "--box X0,Y0,X1,Y1 around it"]


def test_a_mask_drawn_or_edited_by_hand_is_replaced_only_with_force(scene_files, models, tmp_path, monkeypatch):
    """A re-run replaced STEM.mask1.png whatever it held: masks are often touched up by
    hand (or drawn so, with the same names). Refused before any model loads."""
    import scenebreak.masks.masking as masking

    photo = scene_files["image"]
    box = ["--box", "12,8,44,40"]
    first = run("mask", photo, *box, *models, "--out-dir", tmp_path)
    assert first.exit_code == 0, first.output
    mask = Path(first.stdout.strip())
    again = run("mask", photo, *box, *models, "--out-dir", tmp_path)  # unchanged: ours, replaced
    assert again.exit_code == 0, again.output
    edited = np.asarray(Image.open(mask)).copy()
    edited[0:4, 0:4] = 255
    Image.fromarray(edited).save(mask)
    drawn = mask.read_bytes()
    real = masking.Segmenter
    monkeypatch.setattr(masking, "Segmenter", lambda *a, **k: pytest.fail("the segmenter was loaded"))
    refused = run("mask", photo, *box, *models, "--out-dir", tmp_path)
    assert refused.exit_code == 2 and error_lines(refused) == [
        f"Error: {mask} is not a mask scenebreak wrote (yours, or edited since): move it, write elsewhere with "
        "--out-dir, or pass --force to replace it"], refused.output
    assert mask.read_bytes() == drawn
    monkeypatch.setattr(masking, "Segmenter", real)
    forced = run("mask", photo, *box, *models, "--out-dir", tmp_path, "--force")
    assert forced.exit_code == 0 and mask.read_bytes() != drawn, forced.output


def test_masks_of_another_photo_of_the_same_name_are_not_replaced_or_deleted_without_force(tmp_path):
    """Mask names follow the photo's name only: `mask b/cat.jpg` into a folder holding
    a/cat.jpg's masks took them for its own, replaced cat.mask1.png and deleted
    cat.mask2.png and cat.mask3.png (the page did the same to cat.jpg's after cat.png).
    The record now says which photo its masks are of."""
    from scenebreak.masks.files import MaskResult, write_masks

    def photo(folder, colour):
        (tmp_path / folder).mkdir()
        path = tmp_path / folder / "cat.jpg"
        Image.new("RGB", (40, 30), colour).save(path)
        return path, Image.open(path).convert("RGB")

    def masks(count):
        made = []
        for i in range(count):
            m = np.zeros((30, 40), np.uint8)
            m[i * 5:i * 5 + 4, 2:10] = 1
            made.append(MaskResult(f"segment {i + 1}", "auto", 0.9, m))
        return made

    out = tmp_path / "m"
    (a, a_image), (b, b_image) = photo("a", "red"), photo("b", "blue")
    write_masks(a, a_image, masks(3), out)
    theirs = {p.name: p.read_bytes() for p in out.glob("cat.mask[0-9]*.png")}
    assert len(theirs) == 3
    with pytest.raises(InvalidInput, match="cat.mask1.png is a mask of another photo named cat"):
        write_masks(b, b_image, [MaskResult("x", "box", 0.9, np.ones((30, 40), np.uint8))], out)
    assert {p.name: p.read_bytes() for p in out.glob("cat.mask[0-9]*.png")} == theirs
    write_masks(a, a_image, masks(2), out)  # the same photo: its own masks, its leftover removed
    assert sorted(p.name for p in out.glob("cat.mask[0-9]*.png")) == ["cat.mask1.png", "cat.mask2.png"]
    write_masks(b, b_image, masks(1), out, force=True)  # asked: replaced, with the other's leftovers
    assert sorted(p.name for p in out.glob("cat.mask[0-9]*.png")) == ["cat.mask1.png"]
    write_masks(b, b_image, masks(1), out)  # and now b's own
    assert not list(out.glob(".*.tmp"))


def test_a_killed_mask_runs_temporary_files_are_cleaned_up(tmp_path):
    """Mask temporaries had a name of their own that the stale clean-up did not know: a
    run killed while writing left hidden files in the photo's folder for good."""
    from scenebreak.masks.files import MaskResult, write_masks
    from scenebreak.paths import HOST_TAG

    path = tmp_path / "p.png"
    Image.new("RGB", (40, 30)).save(path)
    m = np.zeros((30, 40), np.uint8)
    m[2:10, 2:10] = 1
    dead = tmp_path / f".p.mask1.png.{HOST_TAG}-{2**22 + 11}-abcd.tmp"
    dead.write_bytes(b"half a mask")
    write_masks(path, Image.open(path), [MaskResult("box 1", "box", 0.9, m)], tmp_path)
    assert not dead.exists() and not list(tmp_path.glob(".*.tmp"))


def test_a_path_option_given_with_a_tilde_after_the_equals_sign_is_the_home_folder(scene_files, models, tmp_path,
                                                                                  monkeypatch):
    """A shell leaves `--out-dir=~/masks` as it is: the checks expanded the ~ and the
    writes did not (a folder named ~ in the current one, and printed paths that are not
    where the shell looks)."""
    monkeypatch.setenv("HOME", str(tmp_path / "me"))
    monkeypatch.chdir(tmp_path)
    result = run("mask", scene_files["image"], "--box", "12,8,44,40", *models, "--out-dir=~/masks")
    assert result.exit_code == 0, result.output
    assert [Path(line).parent for line in result.stdout.splitlines()] == [tmp_path / "me" / "masks"]
    assert not (tmp_path / "~").exists()


def test_the_same_photo_edited_in_place_keeps_its_masks_its_own(tmp_path):
    """A photo cropped or retouched in place (or downscaled, as the size limit advises) is
    still the photo whose masks are in the folder: its masks are replaced without --force."""
    from scenebreak.masks.files import MaskResult, write_masks

    path = tmp_path / "cat.jpg"
    Image.new("RGB", (40, 30), "red").save(path)
    mask = np.zeros((30, 40), np.uint8)
    mask[2:10, 2:10] = 1
    write_masks(path, Image.open(path).convert("RGB"), [MaskResult("box 1", "box", 0.9, mask)], tmp_path / "m")
    Image.new("RGB", (40, 30), "green").save(path)  # edited in place
    write_masks(path, Image.open(path).convert("RGB"), [MaskResult("box 1", "box", 0.9, mask[::-1].copy())],
                tmp_path / "m")
    assert (np.asarray(Image.open(tmp_path / "m" / "cat.mask1.png")) > 0).sum() == 64


def test_prompts_are_scaled_as_sams_processor_scales_them(tiny_segmentation):
    """Each click no longer runs SAM's processor over the whole photo (at 50 megapixels a
    150 MB array and a resize per click): the prompt tensors made from the sizes kept at
    set_image are the processor's, exactly."""
    import torch

    from scenebreak.device import choose_device
    from scenebreak.masks.segmenter import Segmenter

    segmenter = Segmenter(str(tiny_segmentation[1]), choose_device("cpu"))
    rng = np.random.default_rng(0)
    for width, height in ((97, 61), (40, 130), (128, 128)):
        image = Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))
        segmenter.set_image(image)
        clicks = [[[float(rng.uniform(0, width)), float(rng.uniform(0, height))] for _ in range(3)] for _ in range(2)]
        boxes = [[1.5, 2.0, width - 3.0, height - 1.0], [0.0, 0.0, width / 2, height / 3]]
        for prompts in ({"input_points": [clicks], "input_labels": [[[1, 0, 1], [1, 1, 0]]]},
                        {"input_boxes": [boxes]},
                        {"input_points": [clicks[:1]], "input_labels": [[[1, 0, 1]]], "input_boxes": [boxes[:1]]}):
            theirs = segmenter.processor(images=image, return_tensors="pt", **prompts)
            ours = segmenter.prompt_tensors(**prompts)
            assert set(ours) == set(prompts)
            for key, value in ours.items():
                assert value.dtype == theirs[key].dtype and torch.equal(value, theirs[key]), (key, width, height)
            for key in ("original_sizes", "reshaped_input_sizes"):
                assert torch.equal(segmenter.sizes[key], theirs[key])


def test_a_loop_of_make_masks_loads_its_models_once(scene_files, tiny_segmentation, tmp_path, monkeypatch):
    """A notebook's or a script's loop over photos loaded SAM and the detector for each
    photo; they are kept for the next call with the same segmenter and device, give the
    same masks as a fresh load, and a failed call keeps nothing."""
    import shutil

    from scenebreak import kept
    from scenebreak.masks import masking

    from helpers import count_loads

    loads = count_loads(monkeypatch, masking.Segmenter, masking.Detector)
    detector, segmenter = (str(p) for p in tiny_segmentation)
    config = MaskConfig(detector=detector, segmenter=segmenter, threshold=0.0)

    def masks(out, **kwargs):
        run = make_masks(scene_files["image"], config=kwargs.pop("config", config), out_dir=tmp_path / out, **kwargs)
        return [np.asarray(Image.open(p)) for p in run.paths]

    first = masks("a", prompts=["red square"], boxes=["12,8,44,40"])
    second = masks("b", prompts=["red square"], boxes=["12,8,44,40"])
    clicks = masks("c", points=["20,20"])
    assert loads == ["Detector", "Segmenter"]
    assert all(np.array_equal(x, y) for x, y in zip(first, second))
    kept.unload()
    fresh = masks("d", prompts=["red square"], boxes=["12,8,44,40"])
    assert loads == ["Detector", "Segmenter"] * 2 and all(np.array_equal(x, y) for x, y in zip(first, fresh))
    assert np.array_equal(clicks[0], masks("e", points=["20,20"])[0])
    with pytest.raises(InvalidInput, match="nothing matches"):
        masks("f", prompts=["red square"], config=MaskConfig(detector=detector, segmenter=segmenter, threshold=1.0))
    assert not kept.holding()  # (the failed call kept nothing: the next one loads afresh)
    masks("f2", points=["20,20"])
    assert loads.count("Segmenter") == 3
    other = shutil.copytree(segmenter, tmp_path / "other-sam")
    masks("g", points=["20,20"], config=MaskConfig(segmenter=str(other)))
    assert loads[-1] == "Segmenter" and loads.count("Segmenter") == 4


def test_a_photo_too_thin_for_segment_anything_is_one_line(models, tmp_path):
    """Its short side, scaled with the long one to SAM's input, rounded to no pixel:
    transformers' "Size must contain 'height' and 'width' keys", a raw ValueError."""
    Image.new("RGB", (300, 1), (90, 90, 90)).save(tmp_path / "line.png")
    result = run("mask", tmp_path / "line.png", "--point", "0,0", *models)
    assert result.exit_code == 2 and "is too thin for Segment Anything" in error_lines(result)[0], result.output


def test_a_prompt_too_long_for_grounding_dino_is_one_line_before_the_segmenter(scene_files, tiny_segmentation):
    """It reads max_text_len tokens (256; the tiny one 64): a longer prompt was a
    RuntimeError about tensor sizes, exit 1."""
    prompt = "red " * 70 + "cat"
    result = run("mask", scene_files["image"], "-p", prompt, "--detector", tiny_segmentation[0],
                 "--segmenter", tiny_segmentation[1])
    assert result.exit_code == 2, result.output
    assert error_lines(result) == [f"Error: -p {prompt!r} is 74 tokens long; this Grounding DINO detector reads at "
                                   "most 64: describe the object in fewer words"]
    assert "loading" not in result.stderr  # (no model loaded)


def test_a_photo_too_long_and_thin_for_the_detector_is_one_line(tiny_segmentation, tmp_path):
    """Grounding DINO keeps its best num_queries (900) of the encoder's tokens, and a
    strip scaled to its input size has fewer: "RuntimeError: selected index k out of
    range", exit 1. (The tiny detector, with 100 queries, meets it at 2000x60.)"""
    import shutil

    from transformers import AutoConfig, GroundingDinoForObjectDetection

    detector = tmp_path / "detector-100-queries"
    shutil.copytree(tiny_segmentation[0], detector)
    config = AutoConfig.from_pretrained(detector)
    config.num_queries = 100
    GroundingDinoForObjectDetection(config).save_pretrained(detector)
    strip = tmp_path / "strip.png"
    Image.new("RGB", (2000, 60), "gray").save(strip)
    result = run("mask", strip, "-p", "cat", "--detector", detector, "--segmenter", tiny_segmentation[1])
    assert result.exit_code == 2, result.output
    assert error_lines(result) == ["Error: the photo is 2000x60: too long and thin for the detector; crop it, or mark "
                                   "the object with --box or --point"]


def test_the_piece_clicked_survives_the_clean_up(scene_files, models, tmp_path, monkeypatch):
    """The clean-up keeps pieces of --min-area and the largest: where SAM gave a small
    piece at the click and a larger one elsewhere, the mask written left out the very
    object clicked, without a word."""
    from scenebreak.masks.segmenter import Segmenter

    def two_pieces(self, points, together=False):
        mask = np.zeros((80, 96), bool)  # (the photo's size)
        mask[5:10, 5:10] = True  # 25 pixels at the click
        mask[30:60, 30:60] = True  # a larger piece elsewhere
        return [(mask, 0.9)]

    monkeypatch.setattr(Segmenter, "from_points", two_pieces)
    result = run("mask", scene_files["image"], "--point", "7,7", "--min-area", "50", "--out-dir", tmp_path, *models)
    assert result.exit_code == 0, result.output
    with Image.open(result.stdout.split()[0]) as written:
        mask = np.asarray(written) > 0
    assert mask[7, 7] and mask[45, 45] and mask.sum() == 25 + 900


def test_a_best_score_just_under_the_threshold_is_not_shown_as_reaching_it():
    from scenebreak.masks.masking import NothingMatches

    assert "(best score 0.99) above --threshold 1" in str(NothingMatches("cat", 0.999999, 1.0))
    assert "(best score 0.29) above --threshold 0.3" in str(NothingMatches("cat", 0.29, 0.3))


def test_auto_with_a_min_area_past_the_photo_says_so(scene_files):
    """It said "--auto found no distinct segment: click on the objects", after SAM's work."""
    result = run("mask", scene_files["image"], "--auto", "--min-area", "100000000", "--segmenter", "someone/absent-sam")
    assert result.exit_code == 2, result.output
    assert error_lines(result) == ["Error: --min-area 100000000 is more pixels than the photo has (96x80): --auto would "
                                   "keep nothing; give a smaller --min-area"]
