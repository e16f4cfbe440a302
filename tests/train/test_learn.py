"""learn() end to end on the tiny model: the method's invariants, resume, errors."""

import numpy as np
import pytest
import torch
from safetensors import safe_open

from helpers import SMALL, stop_after_first_step
from scenebreak import LearnConfig, learn, load_scene
from scenebreak.errors import CheckpointMismatch, Interrupted, InvalidInput, ModelNotAvailable


def _tensor(path, key):
    with safe_open(str(path), framework="pt") as f:
        if key.startswith("*"):  # by suffix: key names differ across transformers versions
            key = next(k for k in f.keys() if k.endswith(key[1:]))
        return f.get_tensor(key)


def _base(tiny_model):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    unet = UNet2DConditionModel.from_pretrained(tiny_model / "unet")
    text = CLIPTextModel.from_pretrained(tiny_model / "text_encoder")
    return unet.state_dict(), text.get_input_embeddings().weight.detach()


def test_scene_has_handles_metadata_and_exact_vocabulary(learned, tiny_model):
    scene = load_scene(learned.path)
    assert scene.tokens == ["<asset1>", "<asset2>"]
    assert learned.handles == scene.tokens
    assert scene.meta["resolution"] == 64 and scene.meta["prediction_type"] == "epsilon"
    assert scene.meta["base_model"]["fingerprint"] and scene.meta["crop_box"] == [8, 0, 88, 80]
    assert scene.meta["config"]["steps1"] == 3 and set(scene.meta["losses"]) == {"phase1", "phase2"}
    assert scene.meta["config"]["lambda_attn"] == 0.01  # the paper's, SD's default
    assert scene.masks.shape == (2, 64, 64) and scene.image.shape == (64, 64, 3)
    _, base_rows = _base(tiny_model)
    learned_rows = _tensor(learned.path, "*token_embedding.weight")
    vocab = base_rows.shape[0]
    assert learned_rows.shape[0] == vocab + 2
    assert torch.equal(learned_rows[:vocab], base_rows)  # ordinary words: bit-identical
    assert torch.equal(learned_rows[vocab:], scene.embeddings)
    # the handles did move away from their initial rows (V - 2N + i)
    assert not torch.equal(scene.embeddings, base_rows[vocab - 4:vocab - 2])


def test_phase1_leaves_the_unet_alone_and_phase2_changes_it(scene_files, tiny_model):
    base_unet, _ = _base(tiny_model)
    key = "down_blocks.2.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    only1 = learn(scene_files["image"], scene_files["masks"], LearnConfig(steps1=3, steps2=0, prior=False),
                  base_model=str(tiny_model), name="p1")
    for name in (key, "conv_in.weight", "up_blocks.0.attentions.0.proj_out.weight"):
        assert torch.equal(_tensor(only1.path, f"unet.{name}"), base_unet[name].half())
    both = learn(scene_files["image"], scene_files["masks"], LearnConfig(steps1=2, steps2=2, lr2=1e-3, prior=False),
                 base_model=str(tiny_model), name="p2")
    assert not torch.equal(_tensor(both.path, f"unet.{key}"), base_unet[key].half())


def test_names_and_init_words(scene_files, tiny_model, monkeypatch):
    """Each handle's row starts as its init word's (its first token's); a --revision
    given with a local folder is said to be ignored, and the scene does not claim it."""
    from transformers import CLIPTokenizer

    from scenebreak.events import Message

    said = []
    result = learn(scene_files["image"], scene_files["masks"],
                   LearnConfig(steps1=1, steps2=0, prior=False, names=("red", "blue"), init_words=("cat", "dog"),
                               lr1=1e-12),  # (one step that barely moves the rows)
                   base_model=str(tiny_model), revision="v9", report=said.append)
    assert result.handles == ["<red>", "<blue>"]
    assert result.path.name == "photo.scene"  # named after the image, in the cache
    scene = load_scene("photo")
    assert scene.tokens == ["<red>", "<blue>"]
    tokenizer = CLIPTokenizer.from_pretrained(tiny_model / "tokenizer")
    _, base_rows = _base(tiny_model)
    for row, word in zip(scene.embeddings, ("cat", "dog")):
        first = tokenizer(word, add_special_tokens=False).input_ids[0]
        torch.testing.assert_close(row.float(), base_rows[first], atol=1e-6, rtol=0)
    assert scene.meta["base_model"]["revision"] is None
    assert any(isinstance(m, Message) and "--revision v9 is for a model on the hub" in m.text for m in said), said
    # So with the folder from SCENEBREAK_BASE_MODEL (no base_model given).
    monkeypatch.setenv("SCENEBREAK_BASE_MODEL", str(tiny_model))
    again = learn(scene_files["image"], scene_files["masks"], LearnConfig(steps1=1, steps2=0, prior=False),
                  revision="v9", name="from-env")
    assert load_scene(again.path).meta["base_model"]["revision"] is None


def test_the_photo_and_masks_are_read_once(scene_files, tiny_model, monkeypatch):
    """learn read and decoded the photo and every mask for its checks, and again after the
    models loaded (a 12-megapixel JPEG twice; and a file changed meanwhile trained other
    pixels than were checked)."""
    import scenebreak.images as images
    import scenebreak.train.learn as learn_module

    reads = []
    for module in (images, learn_module):
        for name in ("load_image", "load_masks"):
            real = getattr(module, name)
            monkeypatch.setattr(module, name, lambda *a, _real=real, _name=name, **k: reads.append(_name) or _real(*a, **k))
    learn(scene_files["image"], scene_files["masks"], LearnConfig(steps1=1, steps2=1, prior=False),
          base_model=str(tiny_model), name="read-once", device="cpu")
    assert reads == ["load_image", "load_masks"]


def test_class_images_are_made_once_and_reused(scene_files, tiny_model, tmp_path):
    from scenebreak.events import Message

    def run(name, model=tiny_model):
        messages = []
        learn(scene_files["image"], scene_files["masks"], LearnConfig(steps1=1, steps2=1, num_class_images=2),
              base_model=str(model), name=name, report=lambda e: messages.append(e.text) if isinstance(e, Message) else None)
        return messages

    assert any("generating 2 class images" in m for m in run("a"))
    assert any("using 2 cached class images" in m for m in run("b"))
    # A fine-tune of the base (same configs and token table, other weights) makes its own.
    from helpers import tuned_copy

    tuned = tuned_copy(tiny_model, tmp_path / "tuned")
    assert any("generating 2 class images" in m for m in run("c", tuned))
    assert any("using 2 cached class images" in m for m in run("d", tuned))
    assert any("using 2 cached class images" in m for m in run("e"))


def test_interrupt_then_resume_matches_an_uninterrupted_run(scene_files, tiny_model):
    from scenebreak.paths import checkpoint_path

    config = LearnConfig(steps1=3, steps2=3, num_class_images=2, lr2=1e-3)
    args = (scene_files["image"], scene_files["masks"], config)
    straight = learn(*args, base_model=str(tiny_model), name="straight")

    for stop_at in (2, 5):  # once inside phase 1, once inside phase 2
        name = f"resumed{stop_at}"
        steps = []
        with pytest.raises(Interrupted, match="--resume"):
            learn(*args, base_model=str(tiny_model), name=name, report=lambda e: steps.append(e) if hasattr(e, "completed") and e.task.startswith("phase") else None,
                  should_stop=lambda: len(steps) >= stop_at)
        assert checkpoint_path(name).exists()
        assert not (checkpoint_path(name).parent.parent / "scenes" / f"{name}.scene").exists()  # nothing half-written
        resumed = learn(*args, base_model=str(tiny_model), name=name, resume=True)
        assert resumed.resumed and not checkpoint_path(name).exists()
        a, b = load_scene(straight.path, weights=True), load_scene(resumed.path, weights=True)
        assert torch.allclose(a.embeddings, b.embeddings, atol=1e-6)
        for key, value in a.weights["unet"].items():
            assert torch.allclose(value.float(), b.weights["unet"][key].float(), atol=1e-3), key


def test_resume_without_checkpoint_or_with_other_settings_is_refused(scene_files, tiny_model, monkeypatch):
    """A --resume with no checkpoint (a mistyped name) was said only after the base model
    had loaded (offline: "not available", hiding it; online: downloaded first); a
    checkpoint of other settings said "drop --resume to start over", which a run without
    --resume then refused (the checkpoint): --force is the way, and works."""
    import scenebreak.families.base_model as base_model

    real_resolve = base_model.resolve_model_dir
    monkeypatch.setattr(base_model, "resolve_model_dir", lambda *a: pytest.fail("the base model was looked up"))
    with pytest.raises(InvalidInput, match="nothing to resume"):
        learn(scene_files["image"], scene_files["masks"], LearnConfig(**SMALL), base_model="someone/not-here",
              resume=True)
    monkeypatch.setattr(base_model, "resolve_model_dir", real_resolve)
    with pytest.raises(Interrupted):
        learn(scene_files["image"], scene_files["masks"], LearnConfig(steps1=2, steps2=0, prior=False), base_model=str(tiny_model),
              name="x", should_stop=stop_after_first_step())
    # (CheckpointMismatch: what `batch` starts over from, and nothing else it is told)
    with pytest.raises(CheckpointMismatch, match="other inputs or settings.*--force in place of --resume"):
        learn(scene_files["image"], scene_files["masks"], LearnConfig(steps1=2, steps2=0, prior=False, lr1=1e-3),
              base_model=str(tiny_model), name="x", resume=True)
    with pytest.raises(InvalidInput, match="add --resume to continue it, or --force to start over"):
        learn(scene_files["image"], scene_files["masks"], LearnConfig(steps1=2, steps2=0, prior=False, lr1=1e-3),
              base_model=str(tiny_model), name="x")
    # A fine-tune of the UNet shares its base's configs and token table (the fingerprint):
    # its stored weights tell it apart.
    from helpers import tuned_copy

    tuned = tuned_copy(tiny_model, tiny_model.parent / "tiny-sd-tuned")
    with pytest.raises(CheckpointMismatch, match="made on another base model"):
        learn(scene_files["image"], scene_files["masks"], LearnConfig(steps1=2, steps2=0, prior=False),
              base_model=str(tuned), name="x", resume=True)


def test_a_stop_asked_while_the_models_load_saves_nothing(scene_files, tiny_model, monkeypatch):
    """The page's Cancel during a load (tens of gigabytes for SDXL or FLUX.1) was heard
    only after the first step, or after the first class images, and saved a checkpoint
    of that one step. It is heard once the models have loaded: nothing is trained or
    saved, and a resumed run's checkpoint stays as it was."""
    import scenebreak.train.trainer as trainer
    from scenebreak.paths import checkpoint_path

    built = []
    real = trainer.Trainer.__init__
    monkeypatch.setattr(trainer.Trainer, "__init__", lambda self, *a, **k: (built.append(1), real(self, *a, **k))[1])
    config = LearnConfig(steps1=2, steps2=2, prior=False)
    with pytest.raises(Interrupted, match="before the training began: nothing was learned or saved"):
        learn(scene_files["image"], scene_files["masks"], config, base_model=str(tiny_model), name="early",
              should_stop=lambda: True)
    assert not built and not checkpoint_path("early").exists()
    with pytest.raises(Interrupted):
        learn(scene_files["image"], scene_files["masks"], config, base_model=str(tiny_model), name="early",
              should_stop=stop_after_first_step())
    saved = checkpoint_path("early").read_bytes()
    with pytest.raises(Interrupted, match="checkpoint of 'early' is kept as it was: run again with --resume"):
        learn(scene_files["image"], scene_files["masks"], config, base_model=str(tiny_model), name="early",
              resume=True, should_stop=lambda: True)
    assert checkpoint_path("early").read_bytes() == saved


def test_a_class_scheduler_the_family_lacks_is_refused_before_the_base_loads(scene_files, tiny_model, monkeypatch):
    """It was found after every weight had loaded, under the name --scheduler (never
    given), and on the CPU even with --no-prior, which ignores it (said so, then failed)."""
    import scenebreak.families.base_model as base_model

    real = base_model.load_components
    monkeypatch.setattr(base_model, "load_components", lambda *a, **k: pytest.fail("the base model loaded"))
    with pytest.raises(InvalidInput, match="--class-scheduler flow: SD 2.x samples with"):
        learn(scene_files["image"], scene_files["masks"], LearnConfig(steps1=1, steps2=0, class_scheduler="flow"),
              base_model=str(tiny_model), name="sampler")
    monkeypatch.setattr(base_model, "load_components", real)
    # Without class images it is no matter (the command line says it is ignored).
    assert learn(scene_files["image"], scene_files["masks"], LearnConfig(steps1=1, steps2=0, prior=False,
                 class_scheduler="flow"), base_model=str(tiny_model), name="sampler", device="cpu").path.exists()


def test_v_prediction_models_train(scene_files, tiny_model, tmp_path):
    import json
    import shutil

    folder = tmp_path / "v-model"
    shutil.copytree(tiny_model, folder)
    config_path = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps(dict(config, prediction_type="v_prediction")))
    result = learn(scene_files["image"], scene_files["masks"], LearnConfig(steps1=1, steps2=1, prior=False), base_model=str(folder))
    assert load_scene(result.path).meta["prediction_type"] == "v_prediction"
    assert np.isfinite(result.losses["phase2"]["loss_last"])


@pytest.mark.parametrize("kwargs, message", [
    (dict(config=LearnConfig(names=("a", "a"))), "duplicate handle"),
    (dict(config=LearnConfig(names=("a",))), "gives 1 value"),
    (dict(config=LearnConfig(resolution=50)), "does not suit this model"),
    (dict(config=LearnConfig(steps1=0, steps2=0)), "not both 0"),
    (dict(device="tpu"), "unknown device"),
])
def test_bad_settings_are_refused_before_anything_is_written(scene_files, tiny_model, kwargs, message):
    from scenebreak.paths import home

    config = kwargs.pop("config", LearnConfig(**SMALL))
    with pytest.raises(InvalidInput if "device" not in kwargs else Exception, match=message):
        learn(scene_files["image"], scene_files["masks"], config, base_model=str(tiny_model), **kwargs)
    assert not (home() / "scenes").exists()


@pytest.mark.parametrize("model", ["tiny_model", "tiny_sdxl"])
def test_a_resolution_the_model_cannot_take_is_refused_before_any_weight_loads(scene_files, model, request, monkeypatch):
    """It was checked after loading the base model (minutes for SDXL or FLUX.1); the
    config files say it. The message is the one the loaded model gives."""
    import scenebreak.families.base_model as base_model

    folder = request.getfixturevalue(model)
    monkeypatch.setattr(base_model, "load_components", lambda *a, **k: pytest.fail("the weights were loaded"))
    with pytest.raises(InvalidInput, match=r"--resolution 36 does not suit this model: use a multiple of \d+ "
                                           r"\(its native size is \d+\)"):
        learn(scene_files["image"], scene_files["masks"], LearnConfig(resolution=36), base_model=str(folder))


def test_a_missing_hub_model_names_the_fix(scene_files):
    with pytest.raises(ModelNotAvailable, match="hf download .*--base-model"):
        learn(scene_files["image"], scene_files["masks"], LearnConfig(**SMALL), base_model="nobody/no-such-model")


def test_phase1_skipping_the_class_example_changes_nothing(scene_files, tiny_model, tmp_path):
    """In phase 1 the class image's loss has no gradient w.r.t. the handles, so the
    trainer skips it; the handles must come out as if it had been computed."""
    from PIL import Image

    from scenebreak.device import choose_device
    from scenebreak.images import prepare
    from scenebreak.train.memory import MemoryPlan
    from scenebreak.families.base_model import load_components
    from scenebreak.train.tokens import add_handles
    from scenebreak.train.trainer import Trainer, TrainInputs

    class ComputesClassExample(Trainer):  # what the original code does
        def _class_example_needed(self, phase):
            return self.config.prior

    class_images = []
    for i in range(2):
        path = tmp_path / f"class{i}.png"
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
        class_images.append(path)
    prepared = prepare(scene_files["image"], scene_files["masks"], 64)
    results = []
    cpu = choose_device("cpu")
    for cls in (Trainer, ComputesClassExample):
        c = load_components(str(tiny_model))
        ids = add_handles(c.tokenizer, c.text_encoder, ["<asset1>", "<asset2>"])
        trainer = cls(c, TrainInputs(prepared.image, torch.from_numpy(prepared.masks), ids, class_images),
                      LearnConfig(steps1=4, steps2=0, num_class_images=2), cpu, ["<asset1>", "<asset2>"],
                      plan=MemoryPlan("fast", False, False, False, False), amp_dtype=None)  # fp32: no bf16 rounding of a batch of 2 vs 1
        records = list(trainer.run())
        results.append((trainer.embedding.handles.detach().clone(), [r.value("rec") for r in records], [r.value("prior") for r in records]))
    (fast, fast_rec, fast_prior), (full, full_rec, full_prior) = results
    assert torch.allclose(fast, full, atol=1e-6), (fast - full).abs().max()
    assert np.allclose(fast_rec, full_rec, rtol=1e-4)
    assert all(p == 0.0 for p in fast_prior) and all(p > 0 for p in full_prior)


def test_gradient_checkpointing_gives_the_same_training(scene_files, tiny_model):
    """The recompute runs the recording processors again: maps must not count twice."""
    runs = []
    for checkpointing in (False, True):
        result = learn(scene_files["image"], scene_files["masks"],
                       LearnConfig(steps1=2, steps2=2, prior=False, lr2=1e-4, gradient_checkpointing=checkpointing),
                       base_model=str(tiny_model), name=f"gc{checkpointing}")
        runs.append((load_scene(result.path).embeddings, result.losses))
    (plain, plain_losses), (ckpt, ckpt_losses) = runs
    assert torch.allclose(plain, ckpt, atol=1e-5)
    assert abs(plain_losses["phase2"]["attn_last"] - ckpt_losses["phase2"]["attn_last"]) < 1e-4


def test_cpu_estimate_for_sd21_base_matches_the_measured_hours():
    from types import SimpleNamespace

    from scenebreak.estimates import cpu_training_estimate

    class Unet:
        def parameters(self):
            return [torch.empty(865_910_724, dtype=torch.uint8)]

    unet, low = Unet(), SimpleNamespace(policy="low")
    # What --memory auto picks on a 24 GiB CPU machine: low; fp32 where the CPU has no bf16.
    text = cpu_training_estimate(unet, 512, LearnConfig(), low, class_images_missing=100, class_steps=50)
    assert "roughly 7.0 hours for 400+400 steps" in text and "100 class images" in text
    assert "roughly 4.2 hours" in cpu_training_estimate(unet, 512, LearnConfig(), low, 0, 50, bf16=True)
    assert "roughly 3.3 hours" in cpu_training_estimate(unet, 512, LearnConfig(tune="lora"), low, 0, 50, bf16=True)


def test_a_resumed_runs_cpu_estimate_counts_the_steps_it_has_left(scene_files, tiny_model):
    """It quoted every step again: 400+400 resumed near its end was still hours."""
    from helpers import Killed, kill_at

    from scenebreak.train.learn import steps_left

    config = LearnConfig(steps1=400, steps2=400)
    assert steps_left({"phase": 1, "step": 150}, config) == (250, 400)
    assert steps_left({"phase": 2, "step": 390}, config) == (0, 10)
    config = LearnConfig(steps1=2, steps2=3, prior=False, checkpoint_every=1)
    with pytest.raises(Killed):
        learn(scene_files["image"], scene_files["masks"], config, base_model=str(tiny_model), name="left",
              report=kill_at(2, 2))
    said = []
    learn(scene_files["image"], scene_files["masks"], config, base_model=str(tiny_model), name="left", resume=True,
          report=lambda e: said.append(getattr(e, "text", "")))
    step = int(next(text for text in said if text.startswith("resuming 'left' at phase 2, step ")).rsplit(" ", 1)[1])
    assert any(f"for 0+{3 - step} steps left" in text for text in said), said


@pytest.mark.parametrize("cuda, tail", [("12.8", "a CUDA GPU takes minutes (--device cuda)"),
                                        (None, "with a CUDA build of torch (this one has none: pipx runpip")])
def test_the_cpu_estimate_says_how_a_gpu_would_count(monkeypatch, cuda, tail):
    """With a CPU-only torch (PyPI's on Windows) --device cuda cannot help: it says what can."""
    from types import SimpleNamespace

    from scenebreak.estimates import cpu_training_estimate

    class Unet:
        def parameters(self):
            return [torch.empty(865_910_724, dtype=torch.uint8)]

    monkeypatch.setattr(torch.version, "cuda", cuda)
    text = cpu_training_estimate(Unet(), 512, LearnConfig(), SimpleNamespace(policy="low"), 0, 50)
    assert text.endswith(tail) or tail in text, text


def test_a_mask_the_losses_grids_do_not_see_is_warned_about(scene_files, tiny_model, tmp_path):
    """A mask narrower than an attention cell came out empty on the loss's grid: its
    handle's target was all zero, a map the attention loss cannot fit, without a word."""
    from PIL import Image

    from scenebreak.events import Message

    speck = np.zeros((80, 96), np.uint8)
    speck[41, 53] = 255  # one pixel: inside the crop, below any grid's cell
    Image.fromarray(speck).save(tmp_path / "speck.png")
    said = []
    learn(scene_files["image"], [scene_files["masks"][0], tmp_path / "speck.png"], LearnConfig(steps1=1, steps2=0,
          prior=False), base_model=str(tiny_model), name="speck", report=said.append)
    warnings = [m.text for m in said if isinstance(m, Message) and "too small" in m.text]
    assert len(warnings) == 1 and warnings[0].startswith("the mask of <asset2> is too small for the"), warnings


def test_class_images_are_dealt_once_per_round_in_a_fresh_order(scene_files, tiny_model, tmp_path, monkeypatch):
    """As the paper's data loader deals them: each of the K class images once in every K
    steps (counted over both phases), the order new each round. Drawn with replacement
    before, a short phase 2 left a third of them out."""
    import scenebreak.train.trainer as trainer_module

    dealt, real = [], trainer_module.Trainer._class_index

    def spy(self, phase):
        dealt.append(real(self, phase))
        return dealt[-1]

    monkeypatch.setattr(trainer_module.Trainer, "_class_index", spy)
    config = LearnConfig(steps1=2, steps2=7, num_class_images=3, seed=5)
    learn(scene_files["image"], scene_files["masks"], config, base_model=str(tiny_model), name="dealt", device="cpu")
    assert len(dealt) == 9
    rounds = [dealt[i:i + 3] for i in range(0, 9, 3)]
    assert all(sorted(r) == [0, 1, 2] for r in rounds)
    assert len({tuple(r) for r in rounds}) > 1  # a fresh order each round (for this seed)
    # A function of the seed and the step: the same run deals the same.
    first, dealt[:] = list(dealt), []
    learn(scene_files["image"], scene_files["masks"], config, base_model=str(tiny_model), name="dealt-again", device="cpu")
    assert dealt == first


def test_a_class_image_folder_is_claimed_only_by_the_model_that_makes_its_first_images(tmp_path, monkeypatch):
    """The folder records the weights that made its images; one of an earlier version's
    images (their maker unknown) is not claimed by whoever adds to it, and a base
    without a weights print (no safetensors file) claims nothing."""
    from PIL import Image

    from scenebreak.families import family_named
    from scenebreak.families.base_model import weights_print
    from scenebreak.train import classimages

    monkeypatch.setenv("SCENEBREAK_HOME", str(tmp_path / "home"))
    family = family_named("SD 2.x")
    first = classimages.cache_folder("fp", "a photo at the beach", 64, family, weights="A")
    first.mkdir(parents=True)
    classimages.claim(first, "A")
    assert classimages.cache_folder("fp", "a photo at the beach", 64, family, weights="A") == first
    other = classimages.cache_folder("fp", "a photo at the beach", 64, family, weights="B")
    assert other != first  # a fine-tune's own folder
    old = classimages.cache_folder("fp", "a photo at the shore", 64, family, weights="B")
    old.mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(old / "0000.png")  # an earlier version's image: maker unknown
    classimages.claim(old, "B")
    assert not (old / classimages.MADE_BY).exists()
    assert classimages.cache_folder("fp", "a photo at the shore", 64, family, weights="C") == old
    # Weights in PyTorch files only: no print (unknown), not a print of nothing that any such folder shares.
    bin_only = tmp_path / "bin-only" / "unet"
    bin_only.mkdir(parents=True)
    (bin_only / "diffusion_pytorch_model.bin").write_bytes(b"weights")
    assert weights_print(tmp_path / "bin-only", family) == ""


def test_what_appears_at_the_output_while_learning_is_kept(scene_files, tiny_model, tmp_path, monkeypatch):
    """The output was checked at the start, hours before the scene is written: a file
    that appeared there meanwhile (another run's scene, anything) is not replaced
    without --force, and only a scene is, with it."""
    import scenebreak.train.learn as learn_module
    from scenebreak.events import Message

    real_train, planted = learn_module._train, {}

    def train(*args, **kwargs):
        real_train(*args, **kwargs)
        planted["path"].write_bytes(planted["data"])

    monkeypatch.setattr(learn_module, "_train", train)
    config = LearnConfig(steps1=1, steps2=1, prior=False)
    for force, data in ((False, b"another run's scene"), (True, b"notes, not a scene")):
        out = tmp_path / f"out-{force}.scene"
        planted.update(path=out, data=data)
        messages = []
        result = learn(scene_files["image"], scene_files["masks"], config, base_model=str(tiny_model), output=out,
                       force=force, report=messages.append)
        assert out.read_bytes() == data and result.path == tmp_path / f"out-{force}-1.scene"
        assert load_scene(result.path).tokens == ["<asset1>", "<asset2>"]
        assert any(isinstance(m, Message) and "appeared while learning and is kept" in m.text for m in messages)
    # A scene there is what --force replaces.
    out = tmp_path / "out-scene.scene"
    planted.update(path=out, data=(tmp_path / "out-False-1.scene").read_bytes())
    result = learn(scene_files["image"], scene_files["masks"], config, base_model=str(tiny_model), output=out, force=True)
    assert result.path == out and out.read_bytes() != planted["data"]


def test_each_phase_shows_from_its_start_and_a_checkpoint_is_said_before_it_is_written(scene_files, tiny_model):
    """A phase's bar came only after its first step (minutes where the step compiles),
    and a multi-gigabyte checkpoint was written without a word."""
    from scenebreak.events import Message, Progress

    events = []
    learn(scene_files["image"], scene_files["masks"], LearnConfig(steps1=2, steps2=2, prior=False),
          base_model=str(tiny_model), name="shown", report=events.append)
    progress = [(e.task, e.completed) for e in events if isinstance(e, Progress) and e.task.startswith("phase")]
    assert progress == [("phase 1", 0), ("phase 1", 1), ("phase 1", 2), ("phase 2", 0), ("phase 2", 1), ("phase 2", 2)]
    texts = [e.text for e in events if isinstance(e, Message)]
    assert "saving a checkpoint of 'shown'" in texts  # (the end of phase 1's)


def test_each_steps_loss_is_the_masked_loss_plus_the_weighted_prior_and_attention_losses(scene_files, tiny_model,
                                                                                         monkeypatch):
    """The prior-preservation and attention terms count, each with its own weight (no
    other test would notice either dropping out of the sum that is back-propagated)."""
    import scenebreak.train.trainer as trainer

    seen, real_step = [], trainer.Trainer.train_step
    monkeypatch.setattr(trainer.Trainer, "train_step",
                        lambda self, phase, steps: seen.append(record := real_step(self, phase, steps)) or record)
    learn(scene_files["image"], scene_files["masks"],
          LearnConfig(steps1=2, steps2=2, num_class_images=1, prior_weight=0.5, lambda_attn=0.3, seed=1),
          base_model=str(tiny_model), name="sum", device="cpu")
    rows = [record.losses.tolist() for record in seen]
    assert len(rows) == 4 and all(attn > 0 for *_, attn in rows), rows
    assert [prior > 0 for _, _, prior, _ in rows] == [False, False, True, True]  # the class image: phase 2's
    for loss, rec, prior, attn in rows:
        assert loss == pytest.approx(rec + 0.5 * prior + 0.3 * attn, rel=1e-5), (loss, rec, prior, attn)


def test_class_scheduler_makes_the_class_images_with_that_sampler(scene_files, tiny_model, monkeypatch):
    """`learn --class-scheduler euler`: the class images are sampled by Euler at its 30
    steps (in a cache of their own), not by the default DDIM."""
    import json

    from click.testing import CliRunner

    import scenebreak.sample.pipeline as pipeline
    from scenebreak.cli.commands import cli
    from scenebreak.paths import class_images_dir

    samplers, real = [], pipeline.make_pipeline
    monkeypatch.setattr(pipeline, "make_pipeline", lambda *a, **k: (
        pipe := real(*a, **k), samplers.append(type(pipe.scheduler).__name__))[0])
    result = CliRunner().invoke(cli, ["learn", str(scene_files["image"]), "--masks", *map(str, scene_files["masks"]),
                                      "--base-model", str(tiny_model), "--steps1", "1", "--steps2", "1",
                                      "--num-class-images", "1", "--class-scheduler", "euler", "--name", "euler", "-q"])
    assert result.exit_code == 0, result.output
    [info] = class_images_dir().glob("*/info.json")
    assert {k: v for k, v in json.loads(info.read_text()).items() if k in ("scheduler", "steps")} == {
        "scheduler": "euler", "steps": 30}
    assert len(list(info.parent.glob("*.png"))) == 1
    assert samplers == ["EulerDiscreteScheduler"], samplers


def test_lora_settings_are_said_to_be_ignored_when_auto_tunes_fully(scene_files, tiny_model):
    """--rank and --lr-lora were ignored silently where --tune auto settled on full
    tuning (with an explicit --tune full the command line says so)."""
    said = []
    result = learn(scene_files["image"], scene_files["masks"], LearnConfig(steps1=1, steps2=1, prior=False, rank=2),
                   base_model=str(tiny_model), name="auto-full", report=lambda e: said.append(getattr(e, "text", "")))
    assert load_scene(result.path).meta["tuning"] == "full"
    assert any(text.startswith("--rank is for LoRA tuning, but --tune auto chose full tuning") for text in said), said
