"""scenebreak from Python, as a notebook, a script or a service uses it: the failures a
user can fix are SceneBreakErrors from every call (not only on the command line), a
value of the wrong kind is one clear InvalidInput before any model loads, one string
where a list is expected is a list of one, the helper models' environment variables
count, and `learn` leaves torch's process-wide settings as it found them."""

from __future__ import annotations

import dataclasses
import errno
import os
import re

import numpy as np
import pytest
import torch

import scenebreak
from scenebreak import GenerateConfig, LearnConfig
from scenebreak.config import BackgroundConfig, EvaluateConfig, MaskConfig
from scenebreak.errors import InvalidInput, NoSpace, OutOfMemory

from helpers import stop_after_first_step


def test_out_of_memory_and_a_full_disk_are_scenebreak_errors_from_generate(learned, tmp_path, monkeypatch):
    """Only learn turned them into OutOfMemory/NoSpace; generate (edit, extract_background,
    evaluate, make_masks, export) let torch's error or the bare OSError out, which a
    caller catching SceneBreakError missed (the command line's line was right)."""
    import scenebreak.sample.pipeline as pipeline
    import scenebreak.sample.sampling as sampling

    real_sample = pipeline.sample
    monkeypatch.setattr(pipeline, "sample", lambda *a, **k: (_ for _ in ()).throw(
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")))
    with pytest.raises(OutOfMemory, match="out of memory on the GPU: try a smaller --batch-size where it is above 1") as caught:
        scenebreak.generate(learned.path, "<asset1>", GenerateConfig(steps=1, scheduler="ddim"), out_dir=tmp_path)
    assert isinstance(caught.value.__cause__, torch.OutOfMemoryError)
    monkeypatch.setattr(pipeline, "sample", real_sample)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x.png"))

    monkeypatch.setattr(sampling, "save_png", full)
    with pytest.raises(NoSpace, match="no space left on device"):
        scenebreak.generate(learned.path, "<asset1>", GenerateConfig(steps=1, scheduler="ddim"), out_dir=tmp_path)


@pytest.mark.parametrize("config, flag", [
    (lambda: LearnConfig(steps1="400"), "--steps1 must be a whole number"),
    (lambda: LearnConfig(steps2=True), "--steps2 must be a whole number"),
    (lambda: LearnConfig(lr1="fast"), "--lr1 must be a number"),
    (lambda: GenerateConfig(num_images=2.0), "--num-images must be a whole number"),
])
def test_a_setting_of_the_wrong_kind_is_one_invalid_input(config, flag):
    """Was a TypeError from the bounds check ("400" steps), or passed and failed deep in
    sampling after the models loaded (2.0 images)."""
    with pytest.raises(InvalidInput, match=flag):
        made = config()
        made.validate(1) if isinstance(made, LearnConfig) else made.validate()


def test_numbers_of_numpy_are_numbers():
    """...and are Python's once checked: scenes, checkpoints and PNG text are JSON, which
    took no numpy number (a seed from numpy failed after the sampling or the training)."""
    import json

    config = GenerateConfig(num_images=np.int64(2), guidance=np.float32(5.0), seed=np.int64(3)).validate()
    assert json.dumps(dataclasses.asdict(config)) and type(config.seed) is int and type(config.guidance) is float
    learn = LearnConfig(steps1=np.int32(10), lr1=np.float64(1e-4), seed=np.int64(2), prior=np.bool_(False),
                        adam_betas=(np.float32(0.9), 0.999)).validate(1)
    assert json.dumps(learn.to_dict()) and learn.prior is False and type(learn.seed) is int


def test_one_string_where_a_list_is_expected_is_a_list_of_one(tmp_path, monkeypatch):
    """Python iterates a string letter by letter: names="cat" became handles <c> <a> <t>
    (when the counts matched), make_masks(prompts="cat") looked for three objects, and
    learn(photo, "m.png") looked for a mask called "m"."""
    assert LearnConfig(names="cat", init_words="cat").names == ("cat",)
    assert LearnConfig(names="cat").validate(1).handle_tokens(1) == ["<cat>"]
    assert EvaluateConfig(words="cat").words == ("cat",)

    import scenebreak.masks.masking as masking

    asked = []

    def count(n, auto, most):
        asked.append(n)
        raise InvalidInput("counted")

    monkeypatch.setattr(masking, "check_count", count)
    with pytest.raises(InvalidInput, match="counted"):
        scenebreak.make_masks(tmp_path / "photo.jpg", prompts="cat")
    assert asked == [1]
    from PIL import Image

    Image.new("RGB", (64, 64)).save(tmp_path / "photo.png")
    with pytest.raises(InvalidInput, match="m.png"):
        scenebreak.learn(tmp_path / "photo.png", str(tmp_path / "m.png"))


def test_the_helper_models_environment_variables_count_from_python_too(monkeypatch):
    from scenebreak.config import default_model

    monkeypatch.setenv("SCENEBREAK_DETECTOR", "/models/gdino")
    monkeypatch.setenv("SCENEBREAK_CLIP_MODEL", "/models/clip")
    monkeypatch.delenv("SCENEBREAK_SEGMENTER", raising=False)
    assert default_model("detector") == "/models/gdino" and default_model("clip") == "/models/clip"
    assert default_model("segmenter") == "facebook/sam-vit-base"


def test_what_python_callers_pass_is_checked_as_the_command_line_is(learned, tmp_path):
    from scenebreak.device import choose_device

    assert choose_device(torch.device("cpu")).name == "cpu"  # was AttributeError: .lower()
    with pytest.raises(InvalidInput, match="--shard 0/0"):
        scenebreak.run_batch(tmp_path / "jobs.jsonl", shard=(0, 0))  # was ZeroDivisionError
    with pytest.raises(InvalidInput, match="variations=4"):  # was silently one clean plate
        scenebreak.extract_background(learned.path, BackgroundConfig(num_images=4), out_dir=tmp_path)
    assert "learn" in dir(scenebreak) and "Terminated" in scenebreak.__all__


def test_learn_leaves_torchs_matmul_precision_as_it_found_it(scene_files, tiny_model, monkeypatch):
    """The trainer lets fp32 matmuls use TF32 on CUDA (faked here), and a notebook's own
    fp32 work after learn silently ran in TF32."""
    import scenebreak.train.trainer as trainer_module

    real_init = trainer_module.Trainer.__init__

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        trainer_module.allow_tf32()  # as on CUDA

    monkeypatch.setattr(trainer_module.Trainer, "__init__", init)
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        scenebreak.learn(scene_files["image"], scene_files["masks"], LearnConfig(steps1=1, steps2=1, prior=False),
                         base_model=str(tiny_model), name="tf32", device="cpu")
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (False, False)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


@pytest.mark.skipif(not hasattr(torch.backends.cuda.matmul, "fp32_precision"), reason="torch before 2.9")
def test_learn_after_torchs_newer_tf32_settings_runs_and_keeps_them(scene_files, tiny_model):
    """A caller who set TF32 the way torch 2.9 on asks (`fp32_precision`, also what
    transformers' helpers set) got a RuntimeError ("mix of the legacy and new APIs") from
    learn on any device: it read the older flags to put them back."""
    switches = [torch.backends, torch.backends.cuda.matmul, torch.backends.cudnn, torch.backends.cudnn.conv,
                torch.backends.cudnn.rnn]
    before = [switch.fp32_precision for switch in switches]
    try:
        torch.backends.cuda.matmul.fp32_precision = "ieee"
        torch.backends.cudnn.conv.fp32_precision = "ieee"
        scenebreak.learn(scene_files["image"], scene_files["masks"], LearnConfig(steps1=1, steps2=1, prior=False),
                         base_model=str(tiny_model), name="tf32-new", device="cpu")
        assert [switch.fp32_precision for switch in switches] == [before[0], "ieee", before[2], "ieee", before[4]]
    finally:
        for switch, value in zip(switches, before):
            switch.fp32_precision = value
    assert not torch.backends.cuda.matmul.allow_tf32  # (the older flags readable again for the tests after)


def test_learn_never_reseeds_the_gpus_random_numbers(scene_files, tiny_model, monkeypatch):
    """LoRA's A matrices are seeded for a repeatable start with torch.manual_seed, which
    also reseeds every GPU's generator, and fork_rng(devices=[]) gives back only the
    CPU's: a caller's own random numbers on the GPU after learn were those of seed 0.
    The CPU's generator alone is seeded (the matrices are made on the CPU)."""
    reseeded = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: reseeded.append(seed))
    monkeypatch.setattr(torch.cuda, "manual_seed", lambda seed: reseeded.append(seed))
    scenebreak.learn(scene_files["image"], scene_files["masks"],
                     LearnConfig(steps1=1, steps2=1, prior=False, tune="lora", rank=2, seed=5),
                     base_model=str(tiny_model), name="rng", device="cpu")
    assert reseeded == []


def test_learn_leaves_the_callers_cpu_random_numbers_as_it_found_them(scene_files, tiny_model):
    """The docs say learn leaves the random generators as it found them; the handles' new
    embedding rows were initialised from torch's global CPU generator, so a notebook's
    `torch.manual_seed(5); learn(...); torch.rand(1)` drew other numbers than seed 5's."""
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    scenebreak.learn(scene_files["image"], scene_files["masks"], LearnConfig(steps1=1, steps2=1, prior=False),
                     base_model=str(tiny_model), name="rng-cpu", device="cpu")
    assert torch.equal(torch.rand(3), expected)


def test_from_python_without_a_reporter_warnings_reach_logging(learned, tmp_path, caplog):
    """The default reporter dropped everything: a notebook never heard that a prompt used
    none of the scene's handles, or that a setting was ignored."""
    import logging

    with caplog.at_level(logging.WARNING, logger="scenebreak"):
        scenebreak.generate(learned.path, "a plain photo", GenerateConfig(steps=1, scheduler="ddim"), out_dir=tmp_path)
    assert any("uses none of the scene's handles" in r.getMessage() for r in caplog.records if r.name == "scenebreak")
    assert not any("seed:" in r.getMessage() for r in caplog.records)  # (notes stay out)


def test_models_given_as_paths_from_python_are_folders(scene_files, tiny_model, tiny_segmentation, tmp_path):
    """`base_model=Path(...)` (and a helper model in MaskConfig) failed with
    "'PosixPath' object has no attribute 'startswith'"."""
    from scenebreak import MaskConfig, make_masks

    result = scenebreak.learn(scene_files["image"], scene_files["masks"], LearnConfig(steps1=1, steps2=1, prior=False),
                              base_model=tiny_model, output=tmp_path / "p.scene")
    assert scenebreak.load_scene(result.path).meta["base_model"]["id"] == str(tiny_model)
    run = make_masks(scene_files["image"], points=[(20, 20)], out_dir=tmp_path / "m",
                     config=MaskConfig(segmenter=tiny_segmentation[1]))
    assert len(run.masks) == 1


@pytest.fixture
def trainers(monkeypatch):
    """Weak references to the trainers made, with Python's cyclic collector off, as it
    is between its (rare, in a big process) passes."""
    import gc
    import weakref

    import scenebreak.train.trainer as trainer_module

    made, real_init = [], trainer_module.Trainer.__init__

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        made.append(weakref.ref(self))

    monkeypatch.setattr(trainer_module.Trainer, "__init__", init)
    gc.collect()
    gc.disable()
    yield made
    gc.enable()


def test_after_learn_returns_its_models_are_gone(scene_files, tiny_model, trainers):
    """The trainer holds the models, the optimizer state and the cached latents, and sits
    in reference cycles (its compiled steps): a notebook's, page's or batch worker's next
    learn or generate loaded beside them, on a GPU that had room for one."""
    scenebreak.learn(scene_files["image"], scene_files["masks"], LearnConfig(steps1=1, steps2=1, prior=False),
                     base_model=str(tiny_model), name="freed", device="cpu")
    assert len(trainers) == 1 and trainers[0]() is None


def test_an_interrupted_learn_kept_as_the_last_error_holds_no_model(scene_files, tiny_model, trainers):
    """A notebook keeps the last exception for %debug (sys.last_value), and with it every
    frame of the call: `learn(..., resume=True)` after an interrupt ran out of memory on
    the first run's models."""
    with pytest.raises(scenebreak.Interrupted) as caught:
        scenebreak.learn(scene_files["image"], scene_files["masks"], LearnConfig(steps1=2, steps2=2, prior=False),
                         base_model=str(tiny_model), name="stopped", device="cpu", should_stop=stop_after_first_step())
    assert caught.value.__traceback__ is not None  # (held, as IPython holds it)
    assert len(trainers) == 1 and trainers[0]() is None


def test_running_out_of_memory_frees_what_the_failed_call_held():
    """Converted to OutOfMemory, the GPU's error stayed its cause, and its frames held the
    models: the retry with a smaller batch ran out of memory on them. An error that is a
    bug keeps its frames (they are the evidence for %debug)."""
    import gc
    import weakref

    from scenebreak.errors import fixable_failures

    class Weights:
        pass

    refs = []

    @fixable_failures()
    def fails(error):
        weights = Weights()
        refs.append(weakref.ref(weights))
        raise error

    gc.disable()
    try:
        with pytest.raises(OutOfMemory) as out_of_memory:
            fails(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
        with pytest.raises(ValueError) as bug:
            fails(ValueError("a bug"))
    finally:
        gc.enable()
    assert out_of_memory.value.__cause__ is not None and refs[0]() is None
    assert bug.value.__traceback__ is not None and refs[1]() is not None


def test_the_library_bars_it_quiets_can_be_brought_back(tmp_path):
    """The first call quiets diffusers', transformers' and the hub's bars for the process,
    and the docs say transformers' `logging.enable_progress_bar()` brings them back; but
    it also set HF_HUB_DISABLE_PROGRESS_BARS=1, which the hub reads once at import and
    puts above any call ("Cannot enable progress bars"), and which every child process
    inherited. (A fresh interpreter: the hub must not be imported before.)"""
    import subprocess
    import sys

    script = (
        "import os, sys, warnings\n"
        "from scenebreak.hub import quiet_libraries\n"
        "assert 'huggingface_hub' not in sys.modules\n"
        "quiet_libraries()\n"
        "import huggingface_hub.utils as hub\n"
        "from transformers.utils import logging\n"
        "assert hub.are_progress_bars_disabled()\n"
        "assert 'HF_HUB_DISABLE_PROGRESS_BARS' not in os.environ\n"
        "with warnings.catch_warnings():\n"
        "    warnings.simplefilter('error')\n"
        "    logging.enable_progress_bar()\n"
        "assert not hub.are_progress_bars_disabled()\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_DISABLE_PROGRESS_BARS"}
    done = subprocess.run([sys.executable, "-c", script], env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def test_threads_generating_at_once_each_get_their_images(learned, tmp_path):
    """kept.py lets a second thread load its own models, but three threads' first
    generate all failed: diffusers' loading patches torch.nn.Module for the process
    while it runs ("Cannot copy out of meta tensor" in the others), and its first import
    by two threads at once handed one a half-made module ("cannot import name
    'DDIMScheduler' from 'diffusers'", said as a scene that is "not valid"). A fresh
    interpreter, for that first import."""
    import subprocess
    import sys

    script = (
        "import sys, threading, scenebreak\n"
        "errors = []\n"
        "def run(i):\n"
        "    try:\n"
        "        scenebreak.generate(sys.argv[1], '<asset1>', scenebreak.GenerateConfig(steps=2, seed=1),\n"
        "                            out_dir=f'{sys.argv[2]}/{i}')\n"
        "    except Exception as exc:\n"
        "        errors.append(f'{type(exc).__name__}: {exc}')\n"
        "threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]\n"
        "[t.start() for t in threads]; [t.join() for t in threads]\n"
        "assert not errors, errors\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(learned.path), str(tmp_path)], capture_output=True,
                          text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    images = [next((tmp_path / str(i)).glob("*.png")) for i in range(3)]
    assert len({p.read_bytes() for p in images}) == 1  # (the same seed: the same image in each thread)


BAD_ARGUMENTS = [  # (call, what the one line says): each was a raw TypeError, ValueError or AttributeError
    (lambda s, f: scenebreak.generate(None, "<asset1>"), "a scene (its path, or a cached scene's name) must be a path"),
    (lambda s, f: scenebreak.generate(3, "<asset1>"), "not int"),
    (lambda s, f: scenebreak.load_scene(None), "a scene (its path, or a cached scene's name) must be a path"),
    (lambda s, f: scenebreak.generate(s, 5), "prompts must be a text or a list of texts"),
    (lambda s, f: scenebreak.generate(s, "<asset1>", {"steps": 2}), "config must be a scenebreak.GenerateConfig"),
    (lambda s, f: scenebreak.generate(s, "<asset1>", LearnConfig()), "config must be a scenebreak.GenerateConfig"),
    (lambda s, f: scenebreak.generate(s, "<asset1>", GenerateConfig(negative=3)), "--negative must be text"),
    (lambda s, f: scenebreak.learn(None, f["masks"]), "image must be a path"),
    (lambda s, f: scenebreak.learn(f["image"], None), "masks must be a path or a list of paths"),
    (lambda s, f: scenebreak.learn(f["image"], [np.zeros((4, 4))]), "each of masks must be a path"),
    (lambda s, f: scenebreak.learn(f["image"], f["masks"], None, name=5), "name must be text"),
    (lambda s, f: scenebreak.learn(f["image"], f["masks"], LearnConfig(prior="no")), "--prior must be True or False"),
    (lambda s, f: scenebreak.learn(f["image"], f["masks"], LearnConfig(init_words=(3, 4))), "--init-words must be a list"),
    (lambda s, f: scenebreak.learn(f["image"], f["masks"], LearnConfig(adam_betas="x")), "adam_betas must be two numbers"),
    (lambda s, f: scenebreak.learn(f["image"], f["masks"], LearnConfig(class_prompt=None)), "--class-prompt must be text"),
    (lambda s, f: scenebreak.edit(f["image"], "spot.png", s), "a list of (mask, prompt) pairs"),
    (lambda s, f: scenebreak.edit(f["image"], [(f["masks"][0], None)], s), "a (mask, prompt) pair"),
    (lambda s, f: scenebreak.edit(f["image"], [(f["masks"][0], "<asset1>")], s, GenerateConfig()),
     "config must be a scenebreak.EditConfig"),
    (lambda s, f: scenebreak.extract_background(s, variations="2"), "variations must be a whole number"),
    (lambda s, f: scenebreak.extract_background(s, prompt=["a"]), "prompt must be text"),
    (lambda s, f: scenebreak.make_masks(None, points=["1,1"]), "image must be a path"),
    (lambda s, f: scenebreak.make_masks(f["image"], prompts=5), "prompts must be a text or a list"),
    (lambda s, f: scenebreak.make_masks(f["image"], points=[(1, 2, 3)]), "points must be X,Y strings"),
    (lambda s, f: scenebreak.make_masks(f["image"], points=["1,1"], config=MaskConfig(fill_holes="no")),
     "--fill-holes must be True or False"),
    (lambda s, f: scenebreak.export(s, None), "out must be a path"),
    (lambda s, f: scenebreak.evaluate(s, 5), "prompts must be a text or a list"),
    (lambda s, f: scenebreak.evaluate(s, ["<asset1>"], GenerateConfig()), "config must be a scenebreak.EvaluateConfig"),
    # Yes-or-no keywords took any value Python finds true: force="no" replaced a scene.
    (lambda s, f: scenebreak.learn(f["image"], f["masks"], name="x", force="no"), "force must be True or False"),
    (lambda s, f: scenebreak.learn(f["image"], f["masks"], resume="no"), "resume must be True or False"),
    (lambda s, f: scenebreak.learn(f["image"], f["masks"], base_model=5), "base_model must be a path"),
    (lambda s, f: scenebreak.learn(f["image"], f["masks"], should_stop=True), "should_stop must be a function"),
    (lambda s, f: scenebreak.generate(s, None, variations="no"), "variations must be True or False"),
    (lambda s, f: scenebreak.generate(s, "<asset1>", grid="no"), "grid must be True or False"),
    (lambda s, f: scenebreak.generate(s, "<asset1>", out_dir=None), "out_dir must be a path"),
    (lambda s, f: scenebreak.generate(s, "<asset1>", report=3), "report must be a function"),
    (lambda s, f: scenebreak.edit(f["image"], [(f["masks"][0], "<asset1>")], s, overwrite="no"),
     "overwrite must be True or False"),
    (lambda s, f: scenebreak.extract_background(s, out_dir=None), "out_dir must be a path"),
    (lambda s, f: scenebreak.export(s, "out", force="no"), "force must be True or False"),
    (lambda s, f: scenebreak.make_masks(f["image"], points=["1,1"], out_dir=3), "out_dir must be a path"),
    (lambda s, f: scenebreak.save_scene(s, "x.scene"), "save_scene takes a Scene"),
    (lambda s, f: scenebreak.run_batch(None), "jobs_file must be a path"),
]


@pytest.mark.parametrize("call, said", BAD_ARGUMENTS, ids=[said[:40] for _, said in BAD_ARGUMENTS])
def test_arguments_of_the_wrong_kind_are_one_clear_invalid_input(call, said, learned, scene_files, tmp_path,
                                                                   monkeypatch):
    """The docs promise that a value of the wrong kind is one clear InvalidInput; from
    Python, these were raw errors from pathlib, tokenizers, torch or scenebreak's own
    insides (some after the models had loaded)."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InvalidInput, match=re.escape(said)):
        call(str(learned.path), scene_files)


def test_one_place_alone_and_a_scene_object_are_taken_as_given(learned, scene_files, tiny_segmentation, tmp_path):
    """A box or click given alone as numbers (`boxes=(10, 10, 40, 40)`), an edit's one
    (mask, prompt) pair without its list, and a Scene object for export were refused with
    raw errors; a Scene loaded without its weights was saved as a scene that could not
    generate."""
    detector, segmenter = tiny_segmentation
    config = MaskConfig(detector=str(detector), segmenter=str(segmenter), threshold=0.0)
    run = scenebreak.make_masks(scene_files["image"], boxes=(12, 8, 44, 40), points=(20, 20), config=config,
                                out_dir=tmp_path / "masks")
    assert len(run.masks) == 2
    edited = scenebreak.edit(scene_files["image"], (scene_files["masks"][0], "<asset1>"), str(learned.path),
                             scenebreak.EditConfig(steps=1, scheduler="ddim"), out_dir=tmp_path / "edit")
    assert len(edited.images) == 1
    scene = scenebreak.load_scene(learned.path)
    assert scenebreak.export(scene, tmp_path / "emb", "embeddings").paths
    with pytest.raises(InvalidInput, match="opened without its weights"):
        scenebreak.save_scene(scene, tmp_path / "copy.scene")
    assert not (tmp_path / "copy.scene").exists()
    with pytest.raises(scenebreak.DeviceNotAvailable):  # (it said the file was not readable)
        scenebreak.load_scene(learned.path, weights=True, device="bogus")
    assert scenebreak.load_scene(learned.path, weights=True, device=scenebreak.choose_device("cpu")).weights
    from pathlib import Path

    from scenebreak.arguments import path_arguments, text_arguments

    # (a glob's generator of masks, or of prompts, as a list would be)
    assert path_arguments(iter(scene_files["masks"]), "masks") == [Path(m) for m in scene_files["masks"]]
    assert text_arguments((p for p in ("a", "b")), "prompts") == ["a", "b"]
    from scenebreak.masks.masking import _places

    # (numpy coordinates, as an array or a list of them, as the lists they hold)
    assert _places(np.array([20, 20]), 2, "points") == [(20, 20)]
    assert _places(np.array([[1, 2], [3, 4]]), 2, "points") == [[1, 2], [3, 4]]
    assert _places([np.array([1.5, 2])], 2, "points") == [(1.5, 2.0)]


def test_each_result_lists_the_files_it_wrote_as_the_command_line_does(learned, tmp_path):
    """`to_dict()` of a result is the command's --json document: the command line added
    its "paths" itself, so a script calling the library found none."""
    result = scenebreak.generate(learned.path, "<asset1>", GenerateConfig(steps=1, scheduler="ddim"), out_dir=tmp_path)
    data = result.to_dict()
    assert data["paths"] == [i["path"] for i in data["images"]] == [str(p) for p in result.paths]
    assert all(os.path.exists(p) for p in data["paths"])
    assert learned.to_dict()["paths"] == [str(learned.path)]


def test_a_missing_peft_is_said_as_a_damaged_install(monkeypatch):
    """peft is a dependency, not an extra: the advice to `pipx inject` it could not help."""
    import builtins

    from scenebreak.errors import SceneBreakError
    from scenebreak.families.lora import require_peft

    real = builtins.__import__
    monkeypatch.setattr(builtins, "__import__", lambda name, *a, **k: (_ for _ in ()).throw(ImportError("no peft"))
                        if name == "peft" else real(name, *a, **k))
    with pytest.raises(SceneBreakError, match="reinstall scenebreak"):
        require_peft()


def test_the_model_loaders_build_one_thread_at_a_time():
    """What loads or makes models runs under kept.py's one-builder lock (two threads'
    first loads raced on transformers' and diffusers' lazy imports). A refactor dropped
    the decorator from load_components once, unnoticed by every other test."""
    from scenebreak.families.base_model import load_components, load_deferred
    from scenebreak.sample.scene_models import open_pipeline, scene_components
    from scenebreak.train.tokens import add_handles, install_handle_embedding, remove_handle_embedding

    for loader in (load_components, load_deferred, scene_components, open_pipeline, add_handles,
                   install_handle_embedding, remove_handle_embedding):
        assert loader.__code__.co_name == "built" and loader.__wrapped__.__name__ == loader.__name__, loader


def test_learn_makes_its_handle_parameters_only_while_no_other_thread_loads_models():
    """A model loading in another thread (diffusers under accelerate's empty weights,
    which patches torch for the whole process) put a learn's new parameters on the meta
    device: "Cannot copy out of meta tensor" or set_data errors, learn beside generate."""
    import threading
    import time

    import torch
    from accelerate import init_empty_weights
    from transformers import CLIPTextConfig, CLIPTextModel

    from scenebreak import kept
    from scenebreak.train.tokens import install_handle_embedding

    encoder = CLIPTextModel(CLIPTextConfig(vocab_size=50, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                           num_attention_heads=2, max_position_embeddings=16))
    loading, made = threading.Event(), {}

    def load_elsewhere():  # as load_components holds it
        with kept._building, init_empty_weights():
            loading.set()
            time.sleep(0.5)

    other = threading.Thread(target=load_elsewhere)
    other.start()
    loading.wait()
    made["module"] = install_handle_embedding(encoder, 2)
    other.join()
    assert made["module"].handles.device == torch.device("cpu") and not made["module"].handles.is_meta


def test_a_scene_object_changed_in_memory_never_shares_the_files_kept_pipeline(learned, tmp_path):
    """The kept pipeline was keyed by the scene's file alone: a Scene whose handle rows a
    caller had changed got the file's pipeline (its change silently ignored) after a call
    by name, and a call by name then got the changed one's."""
    import numpy as np
    from PIL import Image

    from scenebreak import GenerateConfig, generate, load_scene

    config = GenerateConfig(steps=2, seed=1)

    def pixels(scene, out):
        return np.asarray(Image.open(generate(scene, "<asset1> and <asset2>", config, out_dir=tmp_path / out)
                                     .images[0].path), dtype=int)

    changed = load_scene(learned.path, weights=True)
    changed.embeddings = changed.embeddings.flip(0).clone()
    plain = pixels(learned.path, "plain")
    assert np.abs(pixels(changed, "changed") - plain).max() > 8
    assert np.array_equal(pixels(learned.path, "plain-again"), plain)
    assert not np.array_equal(pixels(changed, "changed-again"), plain)


def test_edit_takes_its_regions_from_any_iterable_of_pairs(tmp_path):
    """`edit(photo, zip(masks, prompts), scene)` said "give at least one --mask"."""
    from scenebreak.sample.edit import _regions

    masks, prompts = [tmp_path / "a.png", tmp_path / "b.png"], ["<asset1>", "<asset2>"]
    assert _regions(zip(masks, prompts)) == list(zip(masks, prompts))
    assert _regions(pair for pair in zip(masks, prompts)) == list(zip(masks, prompts))
    with pytest.raises(InvalidInput, match="give at least one --mask"):
        _regions(zip([], []))


def test_every_entry_point_turns_fixable_failures_into_scenebreak_errors():
    """A Python caller catches SceneBreakError for a full disk or running out of memory
    (errors.fixable_failures). An edit that put a helper between `learn` and its
    decorator left `learn` without it for three commits: this says so at once."""
    from scenebreak import errors
    from scenebreak.evaluation.evaluate import evaluate
    from scenebreak.exports.export import export  # (export_scene returns its paths)
    from scenebreak.masks.masking import make_masks
    from scenebreak.sample.edit import edit, extract_background
    from scenebreak.sample.generate import generate
    from scenebreak.train.learn import learn

    def wrapped(fn) -> bool:
        cells = [cell.cell_contents for cell in (getattr(fn, "__closure__", None) or ())]
        return any(getattr(cell, "func", None) is errors.fixable_failures.__wrapped__ for cell in cells)

    entry_points = (learn, generate, edit, extract_background, evaluate, export, make_masks)
    assert [fn.__name__ for fn in entry_points if not wrapped(fn)] == []
    assert not wrapped(errors.fixable_error)  # (the test tells a decorated function from another)
