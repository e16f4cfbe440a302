"""`scenebreak evaluate` on the tiny learned scene, with tiny random CLIP and DINO
models built here and the tiny Grounding DINO + SAM of the `mask` tests. Random weights
make the numbers meaningless: these tests check the mechanics (files, shapes, exit
codes, determinism) and the metric functions on images whose answer is known."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from scenebreak.cli.commands import cli
from scenebreak.config import EvaluateConfig
from scenebreak.errors import InvalidInput
from tinymodels import build_tiny_clip, build_tiny_dino

FAST = ["--steps", "1", "--scheduler", "ddim"]


@pytest.fixture(scope="module")
def metric_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("metric-models")
    return build_tiny_clip(root / "tiny-clip"), build_tiny_dino(root / "tiny-dino")


@pytest.fixture
def models(metric_models, tiny_segmentation):
    clip, dino = metric_models
    detector, segmenter = tiny_segmentation
    return ["--clip-model", clip, "--dino-model", dino, "--detector", detector, "--segmenter", segmenter]


def run(*args, input=None):
    return CliRunner().invoke(cli, [str(a) for a in args], input=input)


def error_lines(result):
    return [line for line in result.stderr.splitlines() if line.startswith("Error")]


PROMPTS = "# two images: one handle alone, then both\na photo of <asset1> in the snow\n\na photo of <asset1> and <asset2>\n"


@pytest.fixture
def prompts_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text(PROMPTS)
    return path


# -- the metric functions, on images whose answer is known ------------------------------------------

def test_identity_is_perfect_for_the_source_itself_and_ignores_the_background(learned, metric_models):
    from scenebreak.scenes.bundle import load_scene
    from scenebreak.device import choose_device
    from scenebreak.evaluation.metrics import DinoScorer, identity_scores

    scene = load_scene(learned.path)
    photo, (red, blue) = Image.fromarray(scene.image), scene.masks
    dino = DinoScorer(str(metric_models[1]), choose_device("cpu"))
    source = dino.features(photo, red)
    assert identity_scores(source, dino.features(photo.copy(), red)) == pytest.approx((1.0, 1.0), abs=1e-5)
    # Another background around the same object: only the object counts.
    other = np.asarray(photo).copy()
    other[~red.astype(bool)] = (10, 200, 10)
    assert identity_scores(source, dino.features(Image.fromarray(other), red)) == pytest.approx((1.0, 1.0), abs=1e-5)
    # Another object: below 1 (the masked score most clearly: no black background to share).
    identity, masked = identity_scores(source, dino.features(photo, blue))
    assert identity < 1 - 1e-6 and masked < 1 - 1e-3


def test_masked_score_pools_only_the_patches_inside_the_object():
    from scenebreak.evaluation.metrics import object_crop, patch_weights

    mask = np.zeros((40, 60), np.uint8)
    mask[10:20, 5:45] = 1  # a wide object: padded to a square, centred
    crop, crop_mask = object_crop(Image.new("RGB", (60, 40), "white"), mask)
    assert crop.size == (40, 40) and crop_mask.sum() == mask.sum()
    assert np.asarray(crop)[0].max() == 0 and np.asarray(crop)[20, 20].min() == 255  # padding black, object kept
    weights = patch_weights(crop_mask, 4, 4)
    assert weights.reshape(4, 4)[1:3].all() and not weights.reshape(4, 4)[[0, 3]].any()
    speck = np.zeros((40, 40), bool)
    speck[0, 0] = True
    assert patch_weights(speck, 4, 4).sum() == 1  # a tiny object still has one patch


def test_clip_prompt_uses_the_words_and_scores_the_same_twice(learned, metric_models):
    from scenebreak.device import choose_device
    from scenebreak.evaluation.evaluate import plain_prompt
    from scenebreak.evaluation.metrics import ClipScorer

    text = plain_prompt("a photo of <asset1> and <asset2> in the snow", {"<asset1>": "cat", "<asset2>": "bowl"})
    assert text == "a photo of cat and bowl in the snow"
    clip = ClipScorer(str(metric_models[0]), choose_device("cpu"))
    image = Image.fromarray(np.asarray(Image.open(learned.path.parent / "inputs" / "photo.png")))
    first = clip.similarity(image, text)
    assert -1 <= first <= 1 and clip.similarity(image, text) == first
    assert clip.similarity(image, "a photo of dog on the moon") != first


def test_best_assignment_is_the_best_one_to_one_pairing():
    import itertools

    from scenebreak.evaluation.metrics import best_assignment

    def total(similarity, pairs):
        return sum(similarity[i][j] for i, j in enumerate(pairs) if j is not None)

    rng = np.random.default_rng(0)
    for rows, cols in [(1, 1), (2, 2), (3, 3), (4, 4), (2, 4), (4, 2), (1, 3), (3, 1), (5, 5)]:
        for _ in range(20):
            similarity = rng.uniform(-1, 1, (rows, cols)).tolist()
            pairs = best_assignment(similarity)
            used = [j for j in pairs if j is not None]
            assert len(used) == min(rows, cols) == len(set(used))
            if rows <= cols:
                best = max(sum(similarity[i][j] for i, j in enumerate(p)) for p in itertools.permutations(range(cols), rows))
            else:
                best = max(sum(similarity[i][j] for j, i in enumerate(p)) for p in itertools.permutations(range(rows), cols))
            assert total(similarity, pairs) == pytest.approx(best)
    # Greedy (row 0 takes its best column first) would score 0.9 + 0.0 here.
    assert best_assignment([[0.9, 0.8], [0.85, 0.0]]) == [1, 0]
    assert best_assignment([]) == [] and best_assignment([[], []]) == [None, None]


def scoring_with_boxes(scene, detect, metric_models, tiny_segmentation, tmp_path, monkeypatch):
    """score(words) -> score_images of the scene's own photo, with the detector's boxes
    for a word from `detect(word)` and each box outlined as itself (a perfect segmenter
    of rectangles)."""
    from types import SimpleNamespace

    from scenebreak.device import choose_device
    from scenebreak.evaluation.evaluate import score_images
    from scenebreak.masks.detector import Detector
    from scenebreak.masks.segmenter import Segmenter

    monkeypatch.setattr(Detector, "detect", lambda self, image, word: detect(word))

    def outline(self, boxes):
        masks = []
        for x0, y0, x1, y1 in (np.asarray(b).astype(int) for b in boxes):
            mask = np.zeros(scene.image.shape[:2], np.uint8)
            mask[y0:y1, x0:x1] = 1
            masks.append((mask, 1.0))
        return masks

    monkeypatch.setattr(Segmenter, "from_boxes", outline)
    Image.fromarray(scene.image).save(tmp_path / "photo.png")
    generated = [SimpleNamespace(path=tmp_path / "photo.png", prompt="a photo of <asset1> and <asset2>", seed=0)]
    clip, dino = metric_models
    detector, segmenter = tiny_segmentation
    refs = {"clip": str(clip), "dino": str(dino), "detector": str(detector), "segmenter": str(segmenter)}
    return lambda words: score_images(scene, generated, words, EvaluateConfig(threshold=0.5), refs, choose_device("cpu"))[0]


def test_objects_sharing_a_word_are_paired_by_identity_not_detection_order(learned, metric_models, tiny_segmentation,
                                                                           tmp_path, monkeypatch):
    """Both handles are "square"; the detector lists the blue square first. Each handle
    must still get its own square: the photo itself then scores identity 1 for both."""
    from scenebreak.masks.ops import bounding_box
    from scenebreak.scenes.bundle import load_scene

    scene = load_scene(learned.path)
    red, blue = (np.asarray(bounding_box(m), np.float32) for m in scene.masks)
    score = scoring_with_boxes(scene, lambda word: (np.stack([blue, red]), np.array([0.9, 0.8])), metric_models,
                               tiny_segmentation, tmp_path, monkeypatch)
    [score] = score({"<asset1>": "square", "<asset2>": "square"})
    objects = {o.handle: o for o in score.objects}
    assert [o.handle for o in score.objects] == ["<asset1>", "<asset2>"]
    assert objects["<asset1>"].detection == 0.8 and objects["<asset2>"].detection == 0.9  # red was detected second
    for o in score.objects:
        assert o.found and (o.identity, o.masked_identity) == pytest.approx((1.0, 1.0), abs=1e-4)


def test_default_prompts_cover_each_handle_and_each_pair():
    from scenebreak.evaluation.evaluate import PAIR_TEMPLATES, SINGLE_TEMPLATES, default_prompts

    prompts = default_prompts(["<a>", "<b>", "<c>"])
    assert len(prompts) == 3 * len(SINGLE_TEMPLATES) + 3 * len(PAIR_TEMPLATES)
    assert "a photo of <b> at the beach" in prompts and "a photo of <a> and <c> in the snow" in prompts
    assert len(default_prompts(["<a>"])) == len(SINGLE_TEMPLATES)  # one object: no pairs


def test_plot_of_no_points_and_of_equal_points():
    from scenebreak.evaluation.plots import scatter

    assert scatter([], "t", "x", "y", ["never found: <a>"]).size == (640, 480)
    image = scatter([("<a>", 0.3, 0.3), ("<b>", 0.3, 0.3)], "t", "x", "y")
    assert len(image.getcolors(100_000)) > 3  # drawn, not blank


# -- the command -----------------------------------------------------------------------------------

def test_cli_prints_both_metrics_and_writes_images_plot_and_report(learned, models, prompts_file, tmp_path):
    out = tmp_path / "eval"
    result = run("evaluate", learned.path, "--prompts-file", prompts_file, "--words", "square", "square",
                 "--threshold", "0", "--out-dir", out, *FAST, *models)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["handle", "word", "images", "found", "prompt", "identity", "masked"]
    rows = {line.split()[0]: line.split() for line in lines[1:4]}
    assert rows["<asset1>"][1:4] == ["square", "2", "2/2"] and rows["<asset2>"][2:4] == ["1", "1/1"]
    assert rows["overall"][1:3] == ["2", "3/3"]
    for row in rows.values():
        assert all(-1 <= float(v) <= 1 for v in row[-3:])
    pngs = sorted(p.name for p in out.glob("photo-a-photo*.png"))
    assert len(pngs) == 2
    plot, report = out / "photo-evaluation.png", out / "photo-evaluation.json"
    assert lines[4:] == [f"images: 2 in {out}", f"plot: {plot}", f"report: {report}"]
    assert Image.open(plot).size == (640, 480)
    assert json.loads(report.read_text())["overall"]["found"] == 3
    assert "seed: 0" in result.stderr and "loading CLIP" in result.stderr


def test_json_shape_and_same_seed_same_numbers(learned, models, prompts_file, tmp_path):
    args = ["evaluate", learned.path, "--prompts-file", prompts_file, "--threshold", "0", "-q", "--json", *FAST, *models]
    first = run(*args, "--out-dir", tmp_path / "a")
    second = run(*args, "--out-dir", tmp_path / "b")
    assert first.exit_code == 0 and second.exit_code == 0, first.output + second.output
    a, b = json.loads(first.stdout), json.loads(second.stdout)
    assert {"scene", "seed", "settings", "models", "handles", "overall", "images", "out_dir", "plot", "report",
            "seconds", "paths"} <= set(a)
    # (the files written, under the key every command's --json has them)
    assert a["paths"] == [i["path"] for i in a["images"]] + [a["plot"], a["report"]]
    assert a["scene_path"] == str(learned.path)
    assert a["seed"] == 0 and a["settings"]["steps"] == 1 and a["settings"]["words"] is None
    assert a["settings"]["threshold"] == 0  # as applied (given here; else the detector's own)
    assert [h["handle"] for h in a["handles"]] == ["<asset1>", "<asset2>"] and a["handles"][0]["word"] == "object"
    assert {"images", "found", "missing", "prompt_similarity", "identity", "masked_identity"} <= set(a["overall"])
    image = a["images"][1]
    assert image["clip_prompt"] == "a photo of object and object" and len(image["objects"]) == 2
    assert {"handle", "word", "found", "detection", "identity", "masked_identity",
            "missing_reason"} == set(image["objects"][0])
    for key in ("handles", "overall"):
        assert a[key] == b[key]
    assert [i["prompt_similarity"] for i in a["images"]] == [i["prompt_similarity"] for i in b["images"]]
    assert [i["objects"] for i in a["images"]] == [i["objects"] for i in b["images"]]
    # Without --threshold, the detector's own is the one recorded (it was null: runs could
    # not tell which they had been scored at).
    from scenebreak.masks.detector import DEFAULT_THRESHOLDS

    assert args[4:6] == ["--threshold", "0"]
    default = run(*args[:4], *args[6:], "--out-dir", tmp_path / "c")
    assert json.loads(default.stdout)["settings"]["threshold"] == DEFAULT_THRESHOLDS["grounding-dino"], default.output
    assert all(np.array_equal(np.asarray(Image.open(x["path"])), np.asarray(Image.open(y["path"])))
               for x, y in zip(a["images"], b["images"]))


def test_objects_not_found_are_missing_not_a_crash(learned, models, tmp_path):
    # No detection scores above 1: nothing is ever found.
    result = run("evaluate", learned.path, "--prompts-file", "-", "--threshold", "1", "--out-dir", tmp_path / "e",
                 *FAST, *models, input="<asset2> on the moon\n")
    assert result.exit_code == 0, result.output
    row = result.stdout.splitlines()[2].split()
    assert row[0] == "<asset2>" and row[3] == "0/1" and row[-2:] == ["-", "-"]
    assert "not found" in result.stderr
    report = json.loads((tmp_path / "e" / "photo-evaluation.json").read_text())
    assert report["handles"][1]["missing"] == 1 and report["handles"][1]["identity"] is None
    assert report["handles"][0]["images"] == 0  # <asset1> was in no prompt
    assert report["images"][0]["objects"][0]["found"] is False
    assert report["images"][0]["objects"][0]["missing_reason"] == "not detected"
    assert Image.open(report["plot"]).size == (640, 480)
    # Run again into the same folder with the plot deleted: the first run's report was overwritten.
    first = (tmp_path / "e" / "photo-evaluation.json").read_bytes()
    (tmp_path / "e" / "photo-evaluation.png").unlink()
    again = run("evaluate", learned.path, "--prompts-file", "-", "--threshold", "1", "--out-dir", tmp_path / "e",
                *FAST, *models, "-q", "--json", input="<asset2> on the moon\n")
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["report"] == str(tmp_path / "e" / "photo-evaluation-1.json")
    assert (tmp_path / "e" / "photo-evaluation.json").read_bytes() == first


def test_an_object_detected_but_outlined_as_nothing_is_missing_with_its_own_advice(learned, models, tmp_path,
                                                                                     monkeypatch):
    """The segmenter outlines nothing in the detector's box: the object is missing, but the
    advice for undetected objects (a lower --threshold) would not help it."""
    from scenebreak.masks.segmenter import Segmenter

    real = Segmenter.from_boxes
    monkeypatch.setattr(Segmenter, "from_boxes", lambda self, boxes: [(np.zeros_like(m), s) for m, s in
                                                                      real(self, boxes)])
    result = run("evaluate", learned.path, "--prompts-file", "-", "--threshold", "0", "--out-dir", tmp_path / "e",
                 *FAST, *models, input="<asset2> on the moon\n")
    assert result.exit_code == 0, result.output
    assert "outlined as nothing" in result.stderr and "not found" not in result.stderr
    report = json.loads((tmp_path / "e" / "photo-evaluation.json").read_text())
    obj = report["images"][0]["objects"][0]
    assert obj["found"] is False and obj["missing_reason"] == "outline empty" and obj["detection"] > 0
    assert report["handles"][1]["missing"] == 1


def test_bad_input_is_exit_2_with_one_line_before_any_image(learned, models, tmp_path):
    (tmp_path / "empty.txt").write_text("# only a comment\n\n")
    (tmp_path / "unknown.txt").write_text("<asset1> fine\n<asset3> on the moon\n")
    (tmp_path / "plain.txt").write_text("a photo of a cat\n")
    out = tmp_path / "out"
    cases = {
        "words count": (["--words", "cat", "bowl", "dog"], "3 word(s) for 2 object handle(s)"),
        "handle as word": (["--words", "<asset1>", "bowl"], "plain words"),
        "empty prompts file": (["--prompts-file", tmp_path / "empty.txt"], "empty.txt has no prompt"),
        "unknown handle": (["--prompts-file", tmp_path / "unknown.txt"], "<asset3>"),
        "prompt without handle": (["--prompts-file", tmp_path / "plain.txt"], "none of the scene's object handles"),
        "threshold": (["--threshold", "2"], "--threshold"),
        "scheduler": (["--scheduler", "plms"], "plms"),
    }
    for label, (extra, expected) in cases.items():
        result = run("evaluate", learned.path, *FAST, *extra, "--out-dir", out, *models)
        assert result.exit_code == 2, (label, result.output)
        assert expected in result.stderr and len(error_lines(result)) == 1, (label, result.stderr)
        assert result.stdout == "" and "Traceback" not in result.output, label
    missing_scene = run("evaluate", tmp_path / "nope.scene", "--out-dir", out, *models)
    assert missing_scene.exit_code == 2 and len(error_lines(missing_scene)) == 1
    assert not out.exists()  # nothing was generated


def test_absent_metric_models_offline_are_exit_1_with_the_fix_before_sampling(learned, models, tmp_path):
    out = tmp_path / "out"
    result = run("evaluate", learned.path, *models, "--clip-model", "someone/absent-clip", "--out-dir", out)
    assert result.exit_code == 1 and len(error_lines(result)) == 1, result.output
    assert "CLIP model 'someone/absent-clip' is not available" in result.stderr
    assert "hf download someone/absent-clip" in result.stderr and "--clip-model" in result.stderr
    both = run("evaluate", learned.path, *models, "--clip-model", "someone/absent-clip", "--dino-model", "someone/absent-dino",
               "--out-dir", out)
    assert both.exit_code == 1 and len(error_lines(both)) == 1
    assert "hf download someone/absent-clip" in both.stderr and "hf download someone/absent-dino" in both.stderr
    assert not out.exists()  # found out before the slow part


def test_model_overrides_come_from_the_environment(learned, models, prompts_file, tmp_path, monkeypatch, metric_models):
    monkeypatch.setenv("SCENEBREAK_DINO_MODEL", "someone/absent-dino-from-env")
    result = run("evaluate", learned.path, "--out-dir", tmp_path / "out", *models[:2], *models[4:])
    assert result.exit_code == 1 and "someone/absent-dino-from-env" in result.stderr
    # A model of the wrong kind is bad input, named as such.
    for option, folder, expected in (("--dino-model", metric_models[0], "DINO ViT"), ("--clip-model", metric_models[1], "CLIP"),
                                     ("--detector", models[7], "Grounding DINO"), ("--segmenter", models[5], "Segment Anything")):
        wrong = run("evaluate", learned.path, "--prompts-file", prompts_file, "--out-dir", tmp_path / "w", *FAST, *models,
                    option, folder)
        assert wrong.exit_code == 2 and expected in wrong.stderr and len(error_lines(wrong)) == 1, (option, wrong.output)
    assert not (tmp_path / "w").exists()  # told before any image was made


def test_library_needs_no_click(learned, metric_models, tiny_segmentation, tmp_path):
    from scenebreak.evaluation.evaluate import evaluate

    clip, dino = metric_models
    detector, segmenter = tiny_segmentation
    config = EvaluateConfig(steps=1, scheduler="ddim", words=("red", "blue"), clip_model=str(clip), dino_model=str(dino),
                            detector=str(detector), segmenter=str(segmenter), threshold=0.0)
    result = evaluate(learned.path, ["<asset2> in the snow"], config, out_dir=tmp_path, device="cpu")
    assert [h.word for h in result.handles] == ["red", "blue"]
    assert result.images[0].clip_prompt == "blue in the snow" and result.overall.images == 1
    with pytest.raises(InvalidInput, match="no prompt"):
        evaluate(learned.path, [" "], config, out_dir=tmp_path)


def test_evaluate_help_has_an_example():
    result = run("evaluate", "--help")
    assert result.exit_code == 0 and "Example" in result.output and "--words" in result.output
    assert "--clip-model" in result.output and "--scheduler" in result.output


def test_evaluate_scores_a_flux_scene(models, prompts_file, scene_files, tmp_path):
    """evaluate samples through the scene's family: on FLUX.1 with its flow sampler."""
    from tinymodels import build_tiny_flux

    from scenebreak import LearnConfig, learn

    flux = build_tiny_flux(tmp_path / "flux")
    scene = learn(scene_files["image"], scene_files["masks"], LearnConfig(steps1=1, steps2=1, prior=False),
                  base_model=str(flux), name="flux-eval")
    result = run("evaluate", scene.path, "--prompts-file", prompts_file, "--threshold", "0", "-q", "--json",
                 "--steps", "1", "--out-dir", tmp_path / "e", *models)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["settings"]["scheduler"] == "flow" and len(report["images"]) == 2


def test_a_dino_processor_that_crops_is_made_to_keep_the_whole_image():
    """DINOv2's processor crops the middle 224 of a 256 resize: the object crop lost its
    edges and the masked score's patch weights sat off the grid."""
    from transformers import BitImageProcessor

    from scenebreak.evaluation.metrics import whole_image

    processor = BitImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 56, "width": 56}, do_center_crop=True)
    image = Image.new("RGB", (80, 80), (0, 0, 0))
    image.paste((255, 0, 0), (0, 0, 80, 4))  # a red top edge
    pixels = processor(images=image, return_tensors="pt", **whole_image(processor))["pixel_values"][0]
    assert tuple(pixels.shape[-2:]) == (56, 56) and pixels[0, 0, 28] > pixels[1, 0, 28]  # the edge is still there
    cropped = processor(images=image, return_tensors="pt")["pixel_values"][0]
    assert not cropped[0, 0, 28] > cropped[1, 0, 28]  # (what the processor alone does)


def test_a_scoring_model_published_with_pytorch_weights_alone_is_downloaded_whole(tmp_path, monkeypatch):
    """facebook/dino-vits16, the default identity model, has only pytorch_model.bin on its
    main branch: the download took the configs alone (safetensors only), and scoring
    then called the download damaged on every machine."""
    import fnmatch
    import shutil

    import huggingface_hub
    import torch
    from transformers import ViTConfig, ViTModel

    from scenebreak.evaluation.metrics import _check_weights
    from scenebreak.hub import transformers_model_folder

    remote = tmp_path / "remote"
    model = ViTModel(ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                               image_size=32, patch_size=8), add_pooling_layer=False)
    model.config.save_pretrained(remote)
    torch.save(model.state_dict(), remote / "pytorch_model.bin")  # (transformers 5 saves safetensors only)
    assert [p.name for p in remote.glob("*.bin")] == ["pytorch_model.bin"] and not list(remote.glob("*.safetensors"))
    snapshot = tmp_path / "cache" / "snapshot"

    def hub(ref, revision=None, allow_patterns=None, local_files_only=False):
        if local_files_only:
            if not snapshot.exists():
                raise huggingface_hub.errors.LocalEntryNotFoundError("not cached")
            return str(snapshot)  # the cached snapshot, whichever of its files are there
        snapshot.mkdir(parents=True, exist_ok=True)
        for path in remote.iterdir():
            if any(fnmatch.fnmatch(path.name, p) for p in allow_patterns):
                shutil.copy(path, snapshot / path.name)
        return str(snapshot)

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", hub)
    folder = transformers_model_folder("facebook/dino-vits16", "identity model", "--dino-model")
    assert (folder / "pytorch_model.bin").is_file()
    _check_weights(folder, "identity model", "facebook/dino-vits16", "--dino-model")
    assert ViTModel.from_pretrained(folder).config.hidden_size == 16


def test_an_object_inside_another_of_another_word_is_found(learned, metric_models, tiny_segmentation, tmp_path,
                                                          monkeypatch):
    """A creature in a bowl: the two words' boxes overlap by IoU 0.5 or more, and the
    second word's box was skipped as "the same object" as the first's: reported missing.
    Only a nearly identical box of another word is the same detection."""
    from scenebreak.scenes.bundle import load_scene

    scene = load_scene(learned.path)
    h, w = scene.image.shape[:2]
    bowl, creature = np.array([4, 4, w - 4, h - 4], np.float32), np.array([8, 8, w - 10, h - 10], np.float32)
    boxes = {"bowl": bowl, "creature": creature, "twin": bowl + 1}
    score = scoring_with_boxes(scene, lambda word: (boxes[word][None], np.array([0.9])), metric_models,
                               tiny_segmentation, tmp_path, monkeypatch)
    for words, found in (({"<asset1>": "bowl", "<asset2>": "creature"}, [True, True]),
                         ({"<asset1>": "bowl", "<asset2>": "twin"}, [True, False])):  # the same box: one detection
        [score_] = score(words)
        assert [o.found for o in score_.objects] == found, words


def test_the_plots_axes_stay_within_a_cosines_range():
    """Ticks of 1.01 and 1.02 for identities near 1, which no cosine reaches."""
    from scenebreak.evaluation.plots import _axis

    for values in ([0.97, 0.995, 1.0], [-1.0, -0.99], [0.2, 0.31]):
        low, high, ticks = _axis(values)
        assert -1.0 <= low <= min(values) and max(values) <= high <= 1.0, (values, low, high)
        assert ticks[0] == low and all(-1.0 - 1e-9 <= t <= 1.0 + 1e-9 for t in ticks) and ticks[-1] <= high + 1e-9


def test_a_report_that_lost_its_name_to_a_racing_run_says_its_own(learned, metric_models, tiny_segmentation, tmp_path,
                                                                  monkeypatch):
    """Another run's report published under this run's name between the plot and the
    report: the report written as NAME-1.json said "report": NAME.json, the other's."""
    import json

    from scenebreak.evaluation import evaluate as module

    plotted = module.write_plot

    def and_a_racing_report(result, path):
        written = plotted(result, path)
        written.with_suffix(".json").write_text("{}")  # the other run's
        return written

    monkeypatch.setattr(module, "write_plot", and_a_racing_report)
    clip, dino = metric_models
    detector, segmenter = tiny_segmentation
    config = EvaluateConfig(steps=1, scheduler="ddim", clip_model=str(clip), dino_model=str(dino),
                            detector=str(detector), segmenter=str(segmenter))
    result = module.evaluate(learned.path, ["<asset1> in the snow"], config, out_dir=tmp_path, device="cpu")
    assert result.report.name == f"{result.scene}-evaluation-1.json"
    assert json.loads((tmp_path / f"{result.scene}-evaluation.json").read_text()) == {}
    assert json.loads(result.report.read_text())["report"] == str(result.report)
