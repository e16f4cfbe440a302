"""Bad inputs and hostile files, as a careless or hostile user would try them: each is
refused with its exit code and one line without a traceback, and nothing outside
what the command owns is written, replaced or deleted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from helpers import craft, set_meta
from scenebreak.cli.commands import cli
from scenebreak.errors import BundleError


@pytest.fixture
def world(tmp_path, learned, tiny_model, scene_files):
    """A workspace: the synthetic photo and masks, a copy of a learned scene, and
    crafted scenes; the CLI runs from inside it."""
    w = {"tmp": tmp_path, "model": tiny_model, "image": scene_files["image"], "masks": scene_files["masks"]}
    scene = tmp_path / "good.scene"
    scene.write_bytes(Path(learned.path).read_bytes())
    w["scene"] = scene
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes")
    w["notes"] = notes
    small = tmp_path / "small.png"
    Image.new("L", (10, 10), 255).save(small)
    w["small"] = small
    empty = tmp_path / "empty.png"
    Image.new("L", (96, 80), 0).save(empty)
    w["empty"] = empty
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "keep.txt").write_text("keep")
    w["folder"] = folder
    home = Path(os.environ["SCENEBREAK_HOME"])
    (home / "scenes").mkdir(parents=True)
    (home / "scenes" / "cached.scene").write_bytes(scene.read_bytes())
    w["home"] = home
    return w


def _tokenizer_json(w, edit):
    """The scene's tokenizer/tokenizer.json, changed by `edit(dict)`, as a tensor."""
    with safe_open(str(w["scene"]), framework="pt") as f:
        data = json.loads(f.get_tensor("file.tokenizer/tokenizer.json").numpy().tobytes())
    edit(data)
    return {"file.tokenizer/tokenizer.json": torch.frombuffer(bytearray(json.dumps(data).encode()), dtype=torch.uint8).clone()}


def _shape(w, key):
    with safe_open(str(w["scene"]), framework="pt") as f:
        return tuple(f.get_slice(key).get_shape())


def _crafted(w, name, **changes):
    return str(craft(w["scene"], w["tmp"] / f"{name}.scene", **changes))


LEARN = lambda w, *extra: ["learn", w["image"], "--masks", *w["masks"], "--base-model", w["model"], *extra]  # noqa: E731

# (id, arguments from the workspace, exit code, a phrase of the one-line message)
CASES = [
    # learn: files
    ("learn-missing-image", lambda w: ["learn", w["tmp"] / "nope.jpg", "--masks", *w["masks"]], 2, "not found"),
    ("learn-image-is-folder", lambda w: ["learn", w["tmp"], "--masks", *w["masks"]], 2, "is a directory"),
    ("learn-image-unreadable", lambda w: ["learn", w["notes"], "--masks", *w["masks"]], 2, "cannot read"),
    ("learn-mask-size", lambda w: ["learn", w["image"], "--masks", w["small"]], 2, "must match the image size"),
    ("learn-mask-empty", lambda w: ["learn", w["image"], "--masks", w["empty"]], 2, "is empty"),
    ("learn-mask-missing", lambda w: ["learn", w["image"], "--masks", w["tmp"] / "m.png"], 2, "not found"),
    ("learn-mask-is-preview", lambda w: ["learn", w["image"], "--masks", w["masks"][0], _preview(w)], 2,
     "is the preview `scenebreak mask` draws"),  # `STEM.mask*.png` matches it too
    ("learn-mask-is-the-photo", lambda w: ["learn", w["image"], "--masks", w["masks"][0], w["image"]], 2,
     "is the photo itself, not a mask"),  # `--masks photo*.png` matches it too
    # learn: names
    ("learn-names-count", lambda w: LEARN(w, "--names", "a"), 2, "gives 1 value"),
    ("learn-names-escape", lambda w: LEARN(w, "--names", "../x", "y"), 2, "invalid handle name"),
    ("learn-names-slash", lambda w: LEARN(w, "--names", "a/b", "y"), 2, "invalid handle name"),
    ("learn-names-empty", lambda w: LEARN(w, "--names", "<>", "y"), 2, "empty"),
    ("learn-names-duplicate", lambda w: LEARN(w, "--names", "a", "a"), 2, "duplicate handle"),
    ("learn-names-case", lambda w: LEARN(w, "--names", "Cat", "cat"), 2, "differ only in letter case"),
    ("learn-name-escape", lambda w: LEARN(w, "--name", "../evil"), 2, "invalid scene name"),
    ("learn-name-too-long", lambda w: LEARN(w, "--name", "a" * 240), 2, "at most 200"),
    # learn: numbers
    ("learn-lr1-nan", lambda w: LEARN(w, "--lr1", "nan"), 2, "finite"),
    ("learn-lr2-inf", lambda w: LEARN(w, "--lr2", "inf"), 2, "finite"),
    ("learn-lambda-nan", lambda w: LEARN(w, "--lambda-attn", "nan"), 2, "finite"),
    ("learn-lr-negative", lambda w: LEARN(w, "--lr1", "-1"), 2, "> 0"),
    ("learn-no-steps", lambda w: LEARN(w, "--steps1", "0", "--steps2", "0"), 2, "not both 0"),
    ("learn-steps-huge", lambda w: LEARN(w, "--steps1", "10000000"), 2, "at most"),
    ("learn-resolution-zero", lambda w: LEARN(w, "--resolution", "0"), 2, "--resolution"),
    ("learn-seed-huge", lambda w: LEARN(w, "--seed", str(2**64)), 2, "--seed"),
    ("learn-seed-negative", lambda w: LEARN(w, "--seed", "-1"), 2, "--seed"),
    ("learn-class-images-zero", lambda w: LEARN(w, "--num-class-images", "0"), 2, "--num-class-images"),
    ("learn-checkpoint-negative", lambda w: LEARN(w, "--checkpoint-every", "-1"), 2, "--checkpoint-every"),
    # every number has a bound, checked as the command line is parsed (10^20 once started work or exited 1)
    ("learn-rank-huge", lambda w: LEARN(w, "--tune", "lora", "--rank", "2000"), 2, "at most 1024"),
    ("learn-rank-giant", lambda w: LEARN(w, "--rank", str(10**20)), 2, "--rank"),
    ("mask-max-masks-past-any-float", lambda w: ["mask", w["image"], "--auto", "--max-masks", "1" + "0" * 400], 2,
     "(401 digits)"),  # a traceback while parsing: {value:g} overflowed
    ("learn-lr2-giant", lambda w: LEARN(w, "--lr2", "1e20"), 2, "--lr2"),
    ("learn-lr-lora-giant", lambda w: LEARN(w, "--lr-lora", "1e20"), 2, "--lr-lora"),
    ("learn-lambda-giant", lambda w: LEARN(w, "--lambda-attn", "1e20"), 2, "--lambda-attn"),
    ("learn-too-many-masks", lambda w: ["learn", w["image"], "--masks", *[w["masks"][0]] * 37, "--base-model", w["model"]], 2,
     "at most 36"),
    ("generate-steps-past-schedule", lambda w: ["generate", w["scene"], "<asset1>", "--steps", "5000"], 2, "--steps"),
    ("generate-batch-giant", lambda w: ["generate", w["scene"], "<asset1>", "--batch-size", str(10**20)], 2, "--batch-size"),
    ("edit-feather-giant", lambda w: ["edit", w["image"], "--scene", w["scene"], "--mask", w["masks"][0], "--feather",
                                      str(10**20), "<asset1>"], 2, "--feather"),
    ("edit-dilate-giant", lambda w: ["edit", w["image"], "--scene", w["scene"], "--mask", w["masks"][0], "--dilate",
                                     str(10**20), "<asset1>"], 2, "--dilate"),
    ("extract-bg-n-giant", lambda w: ["extract-bg", w["scene"], "-n", str(10**20)], 2, "-n"),
    ("mask-dilate-giant", lambda w: ["mask", w["image"], "--auto", "--dilate", str(10**20)], 2, "--dilate"),
    ("mask-max-masks-giant", lambda w: ["mask", w["image"], "--auto", "--max-masks", "1000"], 2, "--max-masks"),
    ("learn-standalone-full", lambda w: LEARN(w, "--tune", "full", "--standalone"), 2, "--standalone"),
    ("learn-fp16-on-cpu", lambda w: LEARN(w, "--mixed-precision", "fp16"), 2, "CUDA"),
    ("learn-bad-device", lambda w: LEARN(w, "--device", "tpu"), 2, "device"),
    ("learn-compile-on-cpu", lambda w: LEARN(w, "--compile"), 2, "CUDA GPUs only"),
    # learn: where it writes
    ("learn-output-under-file", lambda w: LEARN(w, "-o", w["notes"] / "x.scene"), 2, "cannot write"),
    ("learn-output-is-folder", lambda w: LEARN(w, "-o", w["folder"]), 2, "is a directory"),
    ("learn-force-over-non-scene", lambda w: LEARN(w, "-o", w["notes"], "--force"), 2, "is not a scene"),
    ("learn-resume-over-non-scene", lambda w: LEARN(w, "-o", w["notes"], "--resume"), 2, "is not a scene"),
    ("learn-output-exists", lambda w: LEARN(w, "-o", w["scene"]), 2, "already exists"),
    ("learn-resume-nothing", lambda w: LEARN(w, "--resume"), 2, "nothing to resume"),
    ("learn-empty-name", lambda w: LEARN(w, "--name", ""), 2, "--name is empty"),
    ("learn-resume-corrupt", lambda w: LEARN(w, "--resume", "--name", _corrupt_checkpoint(w)), 2, "is damaged"),
    ("learn-base-missing-folder", lambda w: ["learn", w["image"], "--masks", *w["masks"], "--base-model", w["tmp"] / "nope"], 2,
     "not found"),
    ("learn-base-offline", lambda w: ["learn", w["image"], "--masks", *w["masks"], "--base-model", "nobody/nothing"], 1,
     "not available"),
    # generate
    ("generate-unknown-scene", lambda w: ["generate", "no-such-scene", "<asset1>"], 2, "scene not found"),
    ("generate-unknown-handle", lambda w: ["generate", w["scene"], "<asset9> on the moon"], 2, "unknown handle"),
    ("generate-no-images", lambda w: ["generate", w["scene"], "<asset1>", "-n", "0"], 2, "-n"),
    ("generate-no-steps", lambda w: ["generate", w["scene"], "<asset1>", "--steps", "0"], 2, "--steps"),
    ("generate-guidance-nan", lambda w: ["generate", w["scene"], "<asset1>", "--guidance", "nan"], 2, "finite"),
    ("generate-seed-negative", lambda w: ["generate", w["scene"], "<asset1>", "--seed", "-5"], 2, "--seed"),
    ("generate-truncated", lambda w: ["generate", _truncated(w), "<asset1>"], 2, "truncated or corrupt"),
    ("generate-foreign", lambda w: ["generate", _foreign(w), "<asset1>"], 2, "not a scenebreak scene"),
    # hostile scenes
    ("scene-entry-escapes", lambda w: ["generate", _crafted(w, "e1", add={"file.tokenizer/../../evil.txt": torch.zeros(3, dtype=torch.uint8)}),
                                       "<asset1>"], 2, "not a valid scene"),
    ("scene-entry-absolute", lambda w: ["generate", _crafted(w, "e2", add={f"file.{w['tmp']}/evil.txt": torch.zeros(3, dtype=torch.uint8)}),
                                        "<asset1>"], 2, "not a valid scene"),
    ("scene-entry-unknown", lambda w: ["generate", _crafted(w, "e3", add={"file.tokenizer/run.sh": torch.zeros(3, dtype=torch.uint8)}),
                                       "<asset1>"], 2, "not a valid scene"),
    ("scene-handle-escapes", lambda w: ["export", _crafted(w, "h1", meta=set_meta("handles.0.token", "<../../x>")), "-f", "embeddings",
                                        "-o", w["tmp"] / "out"], 2, "not a valid scene"),
    ("scene-name-escapes", lambda w: ["generate", _crafted(w, "n1", meta=set_meta("name", "../../x")), "<asset1>"], 2, "not a valid scene"),
    ("scene-handles-by-case", lambda w: ["show", _crafted(w, "c1", meta=set_meta("handles.1.token", "<ASSET1>"))], 2,
     "differ only in letter case"),  # CLIP lowercases: one token for both
    ("scene-vae-scale-zero", lambda w: ["generate", _crafted(w, "v0", meta=set_meta("configs.vae.scaling_factor", 0)),
                                        "<asset1>"], 2, "scaling_factor is '0'"),  # every image black, exit 0
    ("scene-vae-scale-text", lambda w: ["generate", _crafted(w, "v1", meta=set_meta("configs.vae.scaling_factor", "x")),
                                        "<asset1>"], 2, "not a positive number"),  # failed after the sampling
    ("scene-vae-shift-text", lambda w: ["show", _crafted(w, "v2", meta=set_meta("configs.vae.shift_factor", "0.1"))], 2,
     "shift_factor"),
    ("scene-tokenizer-without-handles", lambda w: ["generate", _crafted(w, "t1", tensors=_tokenizer_json(
        w, lambda t: t.update(added_tokens=[a for a in t["added_tokens"] if not a["content"].startswith("<asset")]))),
        "<asset1>"], 2, "disagree on the handles"),  # the handles' rows went to <|endoftext|>, exit 0
    ("scene-tokenizer-past-the-table", lambda w: ["generate", _crafted(w, "t2", tensors=_tokenizer_json(
        w, lambda t: t["model"]["vocab"].update({"a</w>": 100_000}))), "<asset1>"], 2, "past its text encoder"),
    ("scene-tied-to-nothing", lambda w: ["generate", _crafted(w, "y1", meta=set_meta("tied", {"text_encoder": {
        "x.weight": "no.such.weight"}})), "<asset1>"], 2, "tied weights name weights it does not hold"),
    ("scene-tied-over-a-weight", lambda w: ["generate", _crafted(w, "y2", meta=set_meta("tied", {"text_encoder": {
        "text_model.final_layer_norm.weight": "text_model.final_layer_norm.bias"}})), "<asset1>"], 2, "hold twice"),
    ("scene-tied-damaged", lambda w: ["show", _crafted(w, "y3", meta=set_meta("tied", {"text_encoder": ["x"]}))], 2,
     "tied weights are damaged"),
    ("scene-resolution-huge", lambda w: ["generate", _crafted(w, "r1", meta=set_meta("resolution", 10**6)), "<asset1>"], 2,
     "not a valid scene"),
    ("scene-resolution-odd", lambda w: ["generate", _crafted(w, "r2", meta=set_meta("resolution", 65)), "<asset1>"], 2, "not a valid scene"),
    ("scene-long-string", lambda w: ["show", _crafted(w, "s1", meta=set_meta("created", "x" * 100_000))], 2, "not a valid scene"),
    ("scene-many-handles", lambda w: ["show", _crafted(w, "m1", meta=lambda m: m.update(
        handles=[{"token": f"<a{i}>", "mask_index": i} for i in range(1000)]))], 2, "not a valid scene"),
    ("scene-meta-list", lambda w: ["show", _crafted(w, "l1", meta=lambda m: [1, 2])], 2, "damaged"),
    ("scene-image-shape", lambda w: ["generate", _crafted(w, "i1", tensors={"source.image": torch.zeros(8, 8, 3, dtype=torch.uint8)}),
                                     "<asset1>"], 2, "not a valid scene"),
    ("scene-lora-rank", lambda w: ["show", _crafted(w, "k1", meta=lambda m: m.update(
        lora={"rank": 10**7, "alpha": 1, "unet_targets": ["to_q"], "text_encoder_targets": ["q_proj"]}))], 2, "not a valid scene"),
    ("scene-mask-index", lambda w: ["show", _crafted(w, "x1", meta=set_meta("handles.0.mask_index", 99))], 2, "not a valid scene"),
    ("scene-newer", lambda w: ["show", _crafted(w, "v1", meta=set_meta("format_version", 99))], 2, "newer scenebreak"),
    ("scene-family-unknown", lambda w: ["show", _crafted(w, "f1", meta=set_meta("base_model.family", "FLUX"))], 2, "not one scenebreak knows"),
    ("scene-sdxl-format-1", lambda w: ["show", _crafted(w, "f2", meta=set_meta("base_model.family", "SDXL"))], 2, "needs format 2"),
    ("scene-sdxl-no-second-rows", lambda w: ["generate", _crafted(w, "f3", meta=lambda m: m.update(
        format_version=2, base_model=dict(m["base_model"], family="SDXL"), configs=dict(m["configs"], text_encoder_2={}))),
        "<asset1>"], 2, "handles.embeddings_2"),
    ("scene-second-rows-shape", lambda w: ["generate", _crafted(w, "f4", tensors={"handles.embeddings_2": torch.zeros(5, 8)}),
        "<asset1>"], 2, "not a valid scene"),
    ("scene-config-giant-width", lambda w: ["show", _crafted(w, "c1", meta=set_meta("configs.unet.block_out_channels", [10**9] * 4))],
     2, "not a valid scene"),
    ("scene-config-giant-depth", lambda w: ["generate", _crafted(w, "c2", meta=set_meta("configs.text_encoder.num_hidden_layers",
                                                                                     10**6)), "<asset1>"], 2, "not a valid scene"),
    ("scene-config-many-blocks", lambda w: ["show", _crafted(w, "c3", meta=set_meta("configs.unet.down_block_types",
                                                                                 ["DownBlock2D"] * 1000))], 2, "not a valid scene"),
    ("scene-config-other-width", lambda w: ["generate", _crafted(w, "c4", meta=set_meta("configs.unet.block_out_channels",
                                                                                     [16, 32, 64])), "<asset1>"], 2, "do not fit its config"),
    ("scene-weight-missing", lambda w: ["generate", _crafted(w, "t1", drop=("unet.conv_in.weight",)), "<asset1>"], 2,
     "do not fit its config"),
    ("scene-weight-unknown", lambda w: ["generate", _crafted(w, "t2", add={"unet.extra.weight": torch.zeros(2)}), "<asset1>"], 2,
     "do not fit its config"),
    ("scene-weight-shape", lambda w: ["generate", _crafted(w, "t3", tensors={"unet.conv_in.weight": torch.zeros(3, 3)}), "<asset1>"],
     2, "do not fit its config"),
    ("scene-weight-dtype", lambda w: ["generate", _crafted(w, "t4", tensors={"unet.conv_in.weight": _as_int(w, "unet.conv_in.weight")}),
     "<asset1>"], 2, "not a dtype a scene stores"),
    ("scene-stray-component", lambda w: ["export", _crafted(w, "t5", add={"text_encoder_2.x.weight": torch.zeros(2)}), "-f", "a1111",
                                         "-o", w["tmp"] / "out"], 2, "does not have"),
    ("scene-unet-not-the-family", lambda w: ["show", _crafted(w, "t6", meta=set_meta("configs.unet.addition_embed_type", "text_time"))],
     2, "but the scene says SD 2.x"),
    ("scene-mask-index-twice", lambda w: ["show", _crafted(w, "x2", meta=set_meta("handles.1.mask_index", 0))], 2, "same mask index"),
    ("scene-meta-deep", lambda w: ["show", _deep(w)], 2, "damaged"),
    ("scene-no-configs", lambda w: ["generate", _crafted(w, "x3", meta=lambda m: m.pop("configs") and None), "<asset1>"], 2,
     "no model configs"),
    # fields of the wrong kind, or values no scene holds (were tracebacks, exit 1, or silent harm)
    ("scene-lora-settings-missing", lambda w: ["show", _crafted(w, "y1", meta=lambda m: m.update(tuning="lora", standalone=False))],
     2, "no LoRA settings"),
    ("scene-config-not-a-dict", lambda w: ["show", _crafted(w, "y2", meta=set_meta("configs.extra", 1))], 2, "configs are damaged"),
    ("scene-name-newline", lambda w: ["generate", _crafted(w, "y3", meta=set_meta("name", "x\n")), "<asset1>"], 2,
     "not a valid scene name"),
    ("scene-handle-newline", lambda w: ["export", _crafted(w, "y4", meta=set_meta("handles.0.token", "<a\n>")), "-f", "embeddings",
                                        "-o", w["tmp"] / "out"], 2, "not a valid handle name"),
    ("scene-metadata-huge", lambda w: ["show", _crafted(w, "y6", meta=set_meta("padding", [0] * 400_000))], 2, "at most 1048576"),
    ("scene-lora-alpha-nan", lambda w: ["show", _crafted(w, "y7", meta=lambda m: m.update(
        lora={"rank": 4, "alpha": float("nan"), "unet_targets": ["to_q"], "text_encoder_targets": ["q_proj"]}))], 2, "damaged"),
    ("scene-lora-alpha-zero", lambda w: ["show", _crafted(w, "y8", meta=lambda m: m.update(
        lora={"rank": 4, "alpha": 0, "unet_targets": ["to_q"], "text_encoder_targets": ["q_proj"]}))], 2, "alpha"),
    ("scene-lora-targets-many", lambda w: ["show", _crafted(w, "y9", meta=lambda m: m.update(
        lora={"rank": 4, "alpha": 4, "unet_targets": [f"t{i}" for i in range(1000)], "text_encoder_targets": ["q_proj"]}))],
     2, "LoRA target list"),
    ("scene-revision-not-text", lambda w: ["show", _crafted(w, "z1", meta=set_meta("base_model.revision", ["main"]))], 2,
     "base model is damaged"),
    ("scene-two-backgrounds", lambda w: ["extract-bg", _crafted(w, "z2", meta=lambda m: [h.update(background=True)
                                                                                         for h in m["handles"]] and None)], 2,
     "at most one background"),
    ("scene-image-not-8-bit", lambda w: ["extract-bg", _crafted(w, "z3", tensors={"source.image": _as_float(w, "source.image")})],
     2, "not 8-bit"),
    ("scene-config-no-heads", lambda w: ["generate", _crafted(w, "z4", meta=set_meta("configs.text_encoder.num_attention_heads", 0)),
                                         "<asset1>"], 2, "do not build a model"),
    ("scene-scheduler-impossible", lambda w: ["generate", _crafted(w, "z5", meta=set_meta("configs.scheduler.num_train_timesteps", 1)),
                                              "<asset1>", "--scheduler", "ddim"], 2, "scheduler config"),
    ("scene-config-nested-depth", lambda w: ["generate", _crafted(w, "n1", meta=set_meta(
        "configs.unet.transformer_layers_per_block", [[10**6], 1])), "<asset1>"], 2, "is 1000000 (at most 16)"),
    ("scene-config-reverse-depth", lambda w: ["generate", _crafted(w, "n2", meta=set_meta(
        "configs.unet.reverse_transformer_layers_per_block", [[1], [100000]])), "<asset1>"], 2, "(at most 16)"),
    ("scene-config-deep-list", lambda w: ["generate", _crafted(w, "n3", meta=set_meta(
        "configs.unet.block_out_channels", [[32] * 100])), "<asset1>"], 2, "lists 100 values"),
    ("scene-config-overflowing-float", lambda w: ["generate", _crafted(w, "n4", meta=set_meta(
        "configs.vae.scaling_factor", 123.456), text=lambda t: t.replace("123.456", "1e400")), "<asset1>"], 2,
     "damaged scenebreak metadata"),
    ("scene-embeddings-nan", lambda w: ["export", _crafted(w, "n5", tensors={
        "handles.embeddings": torch.full(_shape(w, "handles.embeddings"), float("nan"))}), "-f", "embeddings", "-o",
        w["tmp"] / "emb"], 2, "not finite"),
    ("scene-embeddings-narrow", lambda w: ["export", _crafted(w, "n6", tensors={
        "handles.embeddings": torch.zeros(_shape(w, "handles.embeddings")[0], 3)}), "-f", "embeddings", "-o",
        w["tmp"] / "emb"], 2, "embeddings of shape"),
    ("scene-embeddings-integers", lambda w: ["export", _crafted(w, "n7", tensors={
        "handles.embeddings": torch.zeros(_shape(w, "handles.embeddings"), dtype=torch.int32)}), "-f", "embeddings",
        "-o", w["tmp"] / "emb"], 2, "not floats"),
    ("scene-file-entry-stranger", lambda w: ["show", _crafted(w, "n8", tensors={
        "file.notes/readme.txt": torch.zeros(4, dtype=torch.uint8)})], 2, "file entry 'notes/readme.txt'"),
    ("scene-tokenizer-file-huge", lambda w: ["generate", _crafted(w, "z6", tensors={
        "file.tokenizer/vocab.json": torch.zeros(2**24 + 1, dtype=torch.uint8)}), "<asset1>"], 2, "at most 16777216"),
    ("evaluate-empty-mask", lambda w: ["evaluate", _crafted(w, "z7", tensors={"source.masks": _emptied(w, 0)})], 2,
     "empty mask for <asset1>"),
    # edit / extract-bg
    ("edit-mask-size", lambda w: ["edit", w["image"], "--scene", w["scene"], "--mask", w["small"], "<asset1>"], 2, "must match"),
    ("edit-output-not-png", lambda w: ["edit", w["image"], "--scene", w["scene"], "--mask", w["masks"][0], "-o", w["tmp"] / "o.jpg",
                                       "<asset1>"], 2, ".png"),
    ("edit-output-exists", lambda w: ["edit", w["image"], "--scene", w["scene"], "--mask", w["masks"][0], "-o", w["small"],
                                      "<asset1>"], 2, "already exists"),
    ("edit-overwrite-non-image", lambda w: ["edit", w["image"], "--scene", w["scene"], "--mask", w["masks"][0], "-o", _fake_png(w),
                                            "--overwrite", "<asset1>"], 2, "is not an image"),
    ("edit-blend-start", lambda w: ["edit", w["image"], "--scene", w["scene"], "--mask", w["masks"][0], "--blend-start", "1",
                                    "<asset1>"], 2, "--blend-start"),
    ("extract-bg-without-background", lambda w: ["extract-bg", w["scene"]], 2, "--background"),
    # export: never deletes what it did not make
    ("export-current-folder", lambda w: ["export", w["scene"], "-o", ".", "--force"], 2, "current folder"),
    ("export-parent-folder", lambda w: ["export", w["scene"], "-o", "..", "--force"], 2, "current folder"),
    ("export-into-cache", lambda w: ["export", w["scene"], "-o", w["home"] / "scenes", "--force"], 2, "is inside scenebreak's cache"),
    ("export-home-folder", lambda w: ["export", w["scene"], "-o", Path.home(), "--force"], 2, "home folder"),
    ("export-foreign-folder", lambda w: ["export", w["scene"], "-o", w["folder"], "--force"], 2, "not an earlier scenebreak export"),
    ("export-onto-file", lambda w: ["export", w["scene"], "-o", w["notes"], "--force"], 2, "is a file"),
    # housekeeping and masks
    ("no-command", lambda w: [], 2, "no command given"),
    ("rm-non-scene", lambda w: ["rm", w["notes"]], 2, "not a"),
    ("show-missing", lambda w: ["show", "ghost"], 2, "scene not found"),
    ("mask-max-masks", lambda w: ["mask", w["image"], "--auto", "--max-masks", "0"], 2, "--max-masks"),
    ("mask-threshold-nan", lambda w: ["mask", w["image"], "-p", "cat", "--threshold", "nan"], 2, "--threshold"),
    ("mask-point-outside", lambda w: ["mask", w["image"], "--point", "5000,5"], 2, "outside the image"),
]


def _corrupt_checkpoint(w):
    """A checkpoint cut short, as a crash mid-copy or a full disk elsewhere leaves one."""
    folder = w["home"] / "checkpoints"
    folder.mkdir(exist_ok=True)
    (folder / "cut.ckpt").write_bytes(b"PK\x03\x04" + b"\x00" * 100)
    return "cut"


def _as_int(w, key):
    with safe_open(str(w["scene"]), framework="pt") as f:
        return f.get_tensor(key).to(torch.int32)


def _emptied(w, index):
    with safe_open(str(w["scene"]), framework="pt") as f:
        masks = f.get_tensor("source.masks").clone()
    masks[index] = 0
    return masks


def _as_float(w, key):
    with safe_open(str(w["scene"]), framework="pt") as f:
        return f.get_tensor(key).float()


def _deep(w):
    """A scene whose metadata nests deeper than Python's stack (json.loads raised RecursionError)."""
    with safe_open(str(w["scene"]), framework="pt") as f:
        data = {k: f.get_tensor(k) for k in f.keys()}
    path = w["tmp"] / "deep.scene"
    save_file(data, str(path), metadata={"format": "scenebreak.scene", "scenebreak": '{"x": ' + "[" * 200_000 + "]" * 200_000 + "}"})
    return path


def _preview(w):
    path = w["tmp"] / "photo.masks-preview.png"
    Image.new("RGB", (96, 80), (200, 200, 200)).save(path)
    return path


def _fake_png(w):
    path = w["tmp"] / "notes.png"
    path.write_text("not a picture")
    return path


def _truncated(w):
    path = w["tmp"] / "truncated.scene"
    path.write_bytes(w["scene"].read_bytes()[:5000])
    return path


def _foreign(w):
    path = w["tmp"] / "foreign.scene"
    save_file({"x": torch.zeros(2)}, str(path), metadata={"format": "pt"})
    return path


def _snapshot(*roots: Path) -> dict:
    """Every file under the roots with its size and modification time (lock files, which
    a command owns, left out)."""
    files = {}
    for root in roots:
        for path in root.rglob("*"):
            if path.is_file() and "locks" not in path.parts:
                stat = path.stat()
                files[str(path)] = (stat.st_size, stat.st_mtime_ns)
    return files


def test_there_are_at_least_forty_cases():
    assert len(CASES) >= 40 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_changes_nothing(case, world, monkeypatch):
    _, make_args, code, phrase = case
    monkeypatch.chdir(world["tmp"])
    args = [str(a) for a in make_args(world)]  # crafted files are made here, before the snapshot
    before = _snapshot(world["tmp"], world["home"])
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == code, (result.exit_code, result.output)
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and phrase in errors[0], result.stderr
    assert "Traceback" not in result.output
    assert _snapshot(world["tmp"], world["home"]) == before
    assert not (world["tmp"].parent / "evil.txt").exists() and not (world["tmp"] / "evil.txt").exists()


# -- files that are not what they seem: FIFOs, endless and non-UTF-8 prompt files --------------------

def _invoke_guarded(args, fifos=(), input=None, seconds=60):
    """Run the CLI, but if it blocks (on opening a FIFO) longer than `seconds`, open the
    FIFOs' other ends so it finishes, and fail."""
    import threading

    box = {}
    thread = threading.Thread(target=lambda: box.setdefault("result", CliRunner().invoke(cli, [str(a) for a in args], input=input)))
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        for fifo in fifos:
            fd = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)
            os.close(fd)
        thread.join()
        pytest.fail(f"{args[0]} blocked on a FIFO")
    return box["result"]


def _one_error(result, code, phrase):
    assert result.exit_code == code, (result.exit_code, result.output)
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and phrase in errors[0], result.stderr
    assert "Traceback" not in result.output
    return errors[0]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this system")
@pytest.mark.parametrize("command", ["generate", "show", "rm", "export"])
def test_a_fifo_given_as_scene_is_refused_without_blocking(command, world, monkeypatch):
    monkeypatch.chdir(world["tmp"])
    fifo = world["tmp"] / "pipe.scene"
    os.mkfifo(fifo)
    args = {"generate": ["generate", fifo, "<asset1>"], "show": ["show", fifo], "rm": ["rm", fifo],
            "export": ["export", fifo, "-f", "embeddings", "-o", world["tmp"] / "out"]}[command]
    _one_error(_invoke_guarded(args, [fifo]), 2, "not a regular file")
    assert fifo.exists()


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this system")
@pytest.mark.parametrize("command", ["learn-photo", "learn-mask", "edit-photo", "edit-mask", "mask"])
def test_a_fifo_given_as_photo_or_mask_is_refused_without_blocking(command, world):
    """Pillow's open blocked on a FIFO for ever; scenes and prompt files were checked already."""
    fifo = world["tmp"] / "pipe.png"
    os.mkfifo(fifo)
    image, mask = (fifo, world["masks"][0]) if command.endswith("photo") or command == "mask" else (world["image"], fifo)
    args = {"learn": ["learn", image, "--masks", mask, "--base-model", world["model"]],
            "edit": ["edit", image, "--scene", world["scene"], "--mask", mask, "<asset1>"],
            "mask": ["mask", image, "--box", "1,1,20,20"]}[command.split("-")[0]]
    _one_error(_invoke_guarded(args, [fifo]), 2, "not a regular file")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this system")
def test_a_fifo_in_the_cache_is_listed_as_unreadable(world):
    fifo = world["home"] / "scenes" / "pipe.scene"
    os.mkfifo(fifo)
    result = _invoke_guarded(["list", "--json"], [fifo])
    assert result.exit_code == 0, result.output
    rows = {row["name"]: row for row in json.loads(result.stdout)["scenes"]}
    assert "not a regular file" in rows["pipe"]["error"] and "handles" in rows["cached"]


@pytest.mark.parametrize("command", ["generate", "evaluate"])
def test_prompt_files_are_bounded_regular_utf8_files(command, world, monkeypatch):
    monkeypatch.chdir(world["tmp"])
    base = [command, world["scene"], *(["<asset1>"] if command == "generate" else []), "--prompts-file"]
    latin = world["tmp"] / "latin1.txt"
    latin.write_bytes("a photo of <asset1> in the café\n".encode("latin-1"))
    _one_error(_invoke_guarded([*base, latin]), 2, "not UTF-8")
    _one_error(_invoke_guarded([*base, "-"], input="<asset1> in the café\n".encode("latin-1")), 2, "not UTF-8")
    if Path("/dev/zero").exists():
        _one_error(_invoke_guarded([*base, "/dev/zero"]), 2, "not a regular file")
    big = world["tmp"] / "big.txt"
    big.write_bytes(b"<asset1> on the moon\n" * 60_000)
    _one_error(_invoke_guarded([*base, big]), 2, "larger than")
    # (A pipe is read, as `<(...)` gives one: tests/test_inputs.py.)


def test_rm_of_the_same_scene_twice_deletes_it_once(world):
    result = CliRunner().invoke(cli, ["rm", "cached", str(world["home"] / "scenes" / "cached.scene")])
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [str(world["home"] / "scenes" / "cached.scene")]
    assert not (world["home"] / "scenes" / "cached.scene").exists()


def test_a_scene_removed_while_generate_opens_it_is_said_as_such(world, monkeypatch):
    """`rm` between reading a scene's metadata and its weights: a raw "[Errno 2] No such
    file or directory", exit 1 (the size in the "loading the weights" note)."""
    import shutil

    import scenebreak.sample.sampling as sampling

    victim = world["home"] / "scenes" / "victim.scene"
    shutil.copy(world["scene"], victim)
    real = sampling.pick_seed
    monkeypatch.setattr(sampling, "pick_seed", lambda *a: (victim.unlink(), real(*a))[1])
    _one_error(CliRunner().invoke(cli, ["generate", "victim", "<asset1>", "--steps", "1"]), 2, "scene not found")


def test_pixels_decoded_as_nan_in_fp32_are_an_error_not_a_black_image():
    """The decode in half precision was checked (and done again in fp32); in fp32 NaN
    pixels were written as a black image, exit 0."""
    import types

    from scenebreak.errors import SceneBreakError
    from scenebreak.sample.pipeline import decode_latents

    vae = types.SimpleNamespace(dtype=torch.float32, config=types.SimpleNamespace(scaling_factor=1.0, shift_factor=None),
                                decode=lambda x: types.SimpleNamespace(sample=torch.full((1, 3, 8, 8), float("nan"))))
    with pytest.raises(SceneBreakError, match="decoding produced NaN"):
        decode_latents(vae, torch.zeros(1, 4, 1, 1))


def test_a_handle_cut_off_by_the_token_limit_is_refused(world, tmp_path):
    filler = "a photo of a red bowl " * 16  # 96 tokens
    result = CliRunner().invoke(cli, ["generate", str(world["scene"]), f"{filler} <asset2>", "--steps", "1", "--out-dir",
                                      str(tmp_path / "out")])
    _one_error(result, 2, "<asset2> falls past")
    assert not (tmp_path / "out").exists()
    result = CliRunner().invoke(cli, ["generate", str(world["scene"]), f"<asset2> {filler}", "--steps", "1", "--seed", "0",
                                      "--out-dir", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "over the text encoder's 77" in result.stderr


def _tokenizer_config(edit):
    """A crafted scene's tokenizer/tokenizer_config.json, changed by `edit(dict)`."""
    def tensors(source):
        with safe_open(str(source), framework="pt") as f:
            config = json.loads(f.get_tensor("file.tokenizer/tokenizer_config.json").numpy().tobytes())
        edit(config)
        return {"file.tokenizer/tokenizer_config.json": torch.frombuffer(bytearray(json.dumps(config).encode()),
                                                                         dtype=torch.uint8).clone()}
    return tensors


def test_a_scene_tokenizer_cannot_name_code_or_its_own_length(world, tmp_path):
    """auto_map would make the Auto classes ask on the terminal to run custom code (and
    with a hub reference fetch it); a crafted model_max_length would size every prompt."""
    def hostile(config):
        config.update(auto_map={"AutoTokenizer": ["evil/repo--evil.EvilTokenizer", None]}, tokenizer_class="EvilTokenizer",
                      model_max_length=10**9)

    scene = craft(world["scene"], tmp_path / "evil-tok.scene", tensors=_tokenizer_config(hostile)(world["scene"]))
    result = CliRunner().invoke(cli, ["generate", str(scene), "<asset1>", "--steps", "1", "--seed", "0", "--out-dir",
                                      str(tmp_path / "out")], input="y\ny\n")
    assert result.exit_code == 0, result.output
    assert "trust_remote_code" not in result.output and "custom code" not in result.output
    from scenebreak.scenes.bundle import load_scene
    from scenebreak.sample.scene_models import scene_tokenizers

    assert scene_tokenizers(load_scene(scene))[0].model_max_length == 77


def test_a_scene_tokenizer_config_that_is_not_json_is_refused(world, tmp_path):
    broken = {"file.tokenizer/tokenizer_config.json": torch.frombuffer(bytearray(b"[" * 100_000), dtype=torch.uint8).clone()}
    scene = craft(world["scene"], tmp_path / "broken-tok.scene", tensors=broken)
    _one_error(CliRunner().invoke(cli, ["generate", str(scene), "<asset1>", "--steps", "1"]), 2, "not a valid scene")


def test_lora_adapters_that_do_not_fit_and_a_mislabelled_sdxl_scene_are_refused(world, learned_sdxl, tmp_path):
    from scenebreak import LearnConfig, learn

    lora = learn(world["image"], world["masks"], LearnConfig(steps1=1, steps2=1, prior=False, tune="lora", rank=2),
                 base_model=str(world["model"]), output=tmp_path / "lora.scene")
    with safe_open(str(lora.path), framework="pt") as f:
        key = next(k for k in f.keys() if k.startswith("unet_lora.") and "lora_A" in k)
        shape = f.get_tensor(key).shape
    wrong = craft(lora.path, tmp_path / "wrong.scene", tensors={key: torch.zeros(shape[0] + 1, shape[1])})
    _one_error(CliRunner().invoke(cli, ["generate", str(wrong), "<asset1>", "--steps", "1"]), 2, "do not fit its config")
    # The scene's settings size the adapters: they are checked against its tensors while
    # still empty (rank 1024 on every layer of FLUX.1 would take 22 GB first).
    import scenebreak.sample.scene_models as scene_models

    checked, real_check = [], scene_models.check_weights_fit

    def check(scene, component, expected, state):
        checked.append(all(p.is_meta for p in expected.values()))
        return real_check(scene, component, expected, state)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(scene_models, "check_weights_fit", check)
        huge = craft(lora.path, tmp_path / "huge.scene", meta=lambda m: m["lora"].update(rank=1024))
        _one_error(CliRunner().invoke(cli, ["generate", str(huge), "<asset1>", "--steps", "1"]), 2, "do not fit its config")
    assert checked == [True]
    norms = craft(lora.path, tmp_path / "norms.scene", meta=lambda m: m["lora"].update(unet_targets=["norm1"]))
    _one_error(CliRunner().invoke(cli, ["generate", str(norms), "<asset1>", "--steps", "1"]), 2,
               "its LoRA targets do not fit its base model")
    # An SDXL scene that says it is SD 2.x (format 1): its second encoder's tensors give it away.
    mislabelled = craft(learned_sdxl.path, tmp_path / "xl-as-sd.scene", meta=lambda m: m.update(
        format_version=1, base_model=dict(m["base_model"], family="SD 2.x")))
    for args in (["show", str(mislabelled)], ["export", str(mislabelled), "-f", "a1111", "-o", str(tmp_path / "a1111")]):
        _one_error(CliRunner().invoke(cli, args), 2, "not a valid scene")
    assert not (tmp_path / "a1111").exists()


@pytest.mark.skipif(not hasattr(os, "O_NOFOLLOW"), reason="no O_NOFOLLOW on this system")
def test_locks_are_never_written_through_a_symbolic_link(world, tmp_path):
    """A link planted where a lock goes must not carry the process id into its target."""
    from scenebreak.errors import SceneBreakError
    from scenebreak.train.locks import class_images_lock, scene_lock

    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    locks = world["home"] / "locks"
    locks.mkdir()
    (locks / "linked.lock").symlink_to(victim)
    with scene_lock("linked"):
        pass
    folder = world["home"] / "class-images" / "abc"
    folder.mkdir(parents=True)
    folder.with_name("abc.lock").symlink_to(victim)
    with class_images_lock(folder):
        pass
    assert victim.read_text() == "precious"
    assert not (locks / "linked.lock").is_symlink()  # the link itself was removed, its target untouched
    # A lock folder that leads out of the cache is refused, naming it.
    outside = tmp_path / "outside"
    outside.mkdir()
    (world["home"] / "class-images" / "elsewhere").symlink_to(outside, target_is_directory=True)
    with pytest.raises(SceneBreakError, match="outside scenebreak's cache"):
        with class_images_lock(world["home"] / "class-images" / "elsewhere" / "set"):
            pass
    assert not any(outside.iterdir())


def test_temporaries_a_killed_write_left_are_removed_by_the_next_one(tmp_path):
    import subprocess
    import sys

    from scenebreak.paths import HOST_TAG, write_atomically

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    target = tmp_path / "photo.scene"
    stale = [tmp_path / f".photo.scene.{HOST_TAG}-{dead.pid}-0a1b.tmp", tmp_path / f".photo.scene.{dead.pid}.tmp"]
    kept = [tmp_path / f".photo.scene.{HOST_TAG}-{os.getpid()}-0a1b.tmp",  # a live run's
            tmp_path / f".photo.scene.{HOST_TAG}-{dead.pid}-0a1b.tmp.mine",  # not a temporary of ours
            tmp_path / f".other.scene.{dead.pid}.tmp"]  # another file's
    for path in stale + kept:
        path.write_text("x")
    write_atomically(target, lambda tmp: tmp.write_text("scene"))
    assert target.read_text() == "scene"
    assert not any(p.exists() for p in stale) and all(p.exists() for p in kept)


def test_safetensors_own_temporary_of_a_scene_is_made_where_a_later_write_removes_it(world, monkeypatch):
    """safetensors writes a `.tmpXXXXXX` of its own beside its target, then renames it:
    a learn killed meanwhile left that whole scene in the cache, a name nothing knew."""
    import subprocess
    import sys

    import safetensors.torch

    import scenebreak.scenes.bundle as bundle
    from scenebreak.paths import HOST_TAG

    targets, real = [], safetensors.torch.save_file

    def save_file(tensors, filename, metadata=None):
        targets.append(Path(filename))
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    folder = world["tmp"] / "out"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    left = folder / f".copy.scene.{HOST_TAG}-{dead.pid}-0a1b.tmpdir"  # what a run killed while saving leaves
    left.mkdir(parents=True)
    (left / ".tmpAbC123").write_bytes(b"x" * 1000)
    bundle.save_scene(bundle.load_scene(world["scene"], weights=True), folder / "copy.scene", replace=True)
    [target] = targets
    assert target.parent.parent == folder and target.parent.name.endswith(".tmpdir")  # its own folder
    assert [p.name for p in folder.iterdir()] == ["copy.scene"]  # that folder gone, and the dead run's


def test_rm_takes_the_copy_a_killed_write_of_the_scene_left(world):
    """A learn killed while writing its scene left `.NAME.scene.<host>-<pid>-xxxx.tmp`
    (the scene's size: gigabytes) that `list` does not show and `rm NAME` left behind,
    by name (the run's checkpoint) or with the scene."""
    import subprocess
    import sys

    from scenebreak.paths import HOST_TAG, checkpoint_path, scene_path

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    copies = []
    for name in ("killed", "cached"):
        copy = scene_path(name).with_name(f".{name}.scene.{HOST_TAG}-{dead.pid}-0a1b.tmp")
        copy.write_bytes(b"x" * 1000)
        copies.append(copy)
    checkpoint_path("killed").parent.mkdir(parents=True, exist_ok=True)
    checkpoint_path("killed").write_bytes(b"state")
    result = CliRunner().invoke(cli, ["rm", "killed", "cached"])
    assert result.exit_code == 0, result.output
    assert not any(copy.exists() for copy in copies) and not checkpoint_path("killed").exists()


def test_a_write_refused_for_permission_is_not_called_a_full_disk(tmp_path, monkeypatch):
    import errno
    import shutil

    import scenebreak.paths
    from scenebreak.paths import write_atomically

    monkeypatch.setattr(scenebreak.paths.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(100, 100, 0))

    def refused(tmp):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp))

    with pytest.raises(PermissionError):
        write_atomically(tmp_path / "a.png", refused)

    def full(tmp):  # how safetensors words a full disk: not an OSError
        raise RuntimeError("Error while serializing: I/O error")

    with pytest.raises(OSError) as raised:
        write_atomically(tmp_path / "b.png", full)
    assert raised.value.errno == errno.ENOSPC


@pytest.mark.parametrize("code, said", [(28, "no space left on device"), (122, "disk quota exceeded")])
def test_safetensors_words_for_a_full_disk_are_one_line_naming_the_fix_with_room_to_spare(tmp_path, monkeypatch,
                                                                                          code, said):
    """A real-sized scene or export: safetensors deleted its part-written file (freeing
    more than the nearly-full margin) before it raised, so its error went out raw
    ("SafetensorError: ... (os error 28)"), no fix named. Its error number says it."""
    import errno

    from scenebreak.errors import NoSpace, fixable_error
    from scenebreak.paths import write_atomically

    if code == 122 and getattr(errno, "EDQUOT", None) != 122:
        pytest.skip("EDQUOT is another number on this system")

    def full(tmp):
        raise RuntimeError(f"Error while serializing: I/O error: {os.strerror(code)} (os error {code})")

    with pytest.raises(OSError) as raised:  # (plenty of space free here)
        write_atomically(tmp_path / "big.scene", full)
    assert raised.value.errno == code and raised.value.filename == str(tmp_path / "big.scene")
    error = fixable_error(raised.value)
    assert isinstance(error, NoSpace) and said in str(error) and "-o" in str(error), error
    with pytest.raises(OSError) as refused:  # not a full disk: said as what it is
        write_atomically(tmp_path / "c.scene", lambda tmp: (_ for _ in ()).throw(
            RuntimeError("Error while serializing: I/O error: Permission denied (os error 13)")))
    assert refused.value.errno == errno.EACCES and fixable_error(refused.value) is None


def test_an_output_folder_that_cannot_be_written_is_refused_before_loading(world, monkeypatch):
    import scenebreak.sample.sampling

    # (Tests may run as root, who can write anywhere: the check itself is stood in for.)
    monkeypatch.setattr(scenebreak.sample.sampling, "is_writable_folder", lambda folder: "readonly" not in str(folder))
    (world["tmp"] / "readonly").mkdir()
    result = CliRunner().invoke(cli, ["generate", str(world["scene"]), "<asset1>", "--out-dir", str(world["tmp"] / "readonly")])
    _one_error(result, 2, "not a folder you can write to")


@pytest.mark.parametrize("where", ["--out-dir readonly", "-o readonly/edit.png", "-o notes.txt/edit.png"])
def test_edit_refuses_an_output_it_cannot_write_before_loading(world, monkeypatch, where):
    """edit checked where its images go only when it saved them, after sampling: the
    edits were lost to a Permission-denied line naming a temp file."""
    import scenebreak.sample.edit
    import scenebreak.sample.sampling

    def writable(folder):  # tests may run as root, who can write anywhere: the check is stood in for
        return "readonly" not in str(folder) and real(folder)

    def no_load(*args, **kwargs):
        raise AssertionError("the models were loaded")

    real = scenebreak.sample.sampling.is_writable_folder
    for module in (scenebreak.sample.edit, scenebreak.sample.sampling):
        monkeypatch.setattr(module, "is_writable_folder", writable)
    monkeypatch.setattr(scenebreak.sample.sampling, "open_pipeline", no_load)
    option, target = where.split()
    (world["tmp"] / "readonly").mkdir()
    result = CliRunner().invoke(cli, ["edit", str(world["image"]), "--scene", str(world["scene"]), "--mask",
                                      str(world["masks"][0]), "<asset1>", option, str(world["tmp"] / target)])
    _one_error(result, 2, "not a folder you can write to")
    assert "Traceback" not in result.output


def test_images_of_a_scene_with_the_longest_name_fit_the_file_system(world, tmp_path):
    """Scene names may have 200 characters; a prompt's slug and a 19-digit seed after
    one went past 255 bytes (Errno 36)."""
    name = "s" * 200
    craft(world["scene"], world["home"] / "scenes" / f"{name}.scene", meta=set_meta("name", name))
    seed = str(2**62)
    result = CliRunner().invoke(cli, ["generate", name, "<asset1> in a very long prompt about the moon", "--grid",
                                      "--steps", "1", "--seed", seed, "--out-dir", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    paths = [Path(line) for line in result.stdout.splitlines()]
    assert len(paths) == 2 and all(p.is_file() and len(p.name.encode()) + 32 <= 255 for p in paths)
    assert all(p.name.startswith("s" * 100) for p in paths)


def _garble_weights(folder: Path) -> None:
    for path in folder.glob("*.safetensors"):
        path.write_bytes(b"not a safetensors file" * 10)


def _widen_config(folder: Path, key: str) -> None:
    config = json.loads((folder / "config.json").read_text())
    config[key] += 8
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("part, damage, phrase", [
    ("unet", _garble_weights, "unable to load weights"),
    ("text_encoder", _garble_weights, "header"),  # safetensors' own error, neither OSError nor ValueError
    ("vae", _garble_weights, "unable to load weights"),
    ("text_encoder", lambda folder: _widen_config(folder, "hidden_size"), "do not fit its config.json"),
    ("unet", lambda folder: _widen_config(folder, "cross_attention_dim"), "expected shape"),
])
def test_a_damaged_base_model_folder_is_one_line_naming_the_fix(part, damage, phrase, world, tmp_path):
    """A base model folder that is there but does not load (a weights file garbled, a
    config from another model) is one line and exit 1 that says to copy it again (it is
    a folder: `hf download` of a path would be no fix), never a bare library error."""
    import shutil

    model = tmp_path / "damaged-model"
    shutil.copytree(world["model"], model)
    damage(model / part)
    result = CliRunner().invoke(cli, [str(a) for a in ["learn", world["image"], "--masks", *world["masks"], "--base-model",
                                                         model, "--steps1", "1", "--steps2", "0", "--no-prior"]])
    line = _one_error(result, 1, f"cannot load the base model from {model}")
    assert phrase in line.lower() and "Fix: copy the model there again" in line and "hf download" not in line


ESCAPES = {"base_model.id": "evil\x1b[31mRED", "created": "2026 \x1b[2J\x1b]0;pwned\x07", "source.masks": ["m\x1b[5m.png", "b.png"]}


def test_a_strangers_scene_text_is_shown_never_obeyed(world):
    """Escape sequences in a scene's metadata (its base model's id, its date, the names of
    the masks it learned from) reach the terminal as visible escapes in `show` and
    `list`, never as the sequences themselves (which clear the screen, retitle the
    window, recolour what follows); and losses of the wrong type are shown, not a crash."""
    def edit(meta):
        for path, value in ESCAPES.items():
            set_meta(path, value)(meta)
        meta["losses"]["phase1"]["loss_first"] = "x"

    craft(world["scene"], world["home"] / "scenes" / "evil.scene", meta=edit)
    shown = CliRunner().invoke(cli, ["show", "evil"])
    assert shown.exit_code == 0, shown.output
    assert "\x1b" not in shown.output and "\x07" not in shown.output
    for visible in ("evil\\x1b[31mRED", "2026 \\x1b[2J\\x1b]0;pwned\\x07", "m\\x1b[5m.png", "loss x ->"):
        assert visible in shown.stdout, shown.stdout
    listed = CliRunner().invoke(cli, ["list"])
    assert listed.exit_code == 0 and "evil\t<asset1> <asset2>\t" in listed.stdout and "\x1b" not in listed.output


def test_the_error_line_and_messages_show_control_characters_as_escapes(world):
    from io import StringIO

    from rich.console import Console

    from scenebreak.cli.console import ConsoleReporter
    from scenebreak.events import Message

    missing = world["tmp"] / "a\x1b[2Jb\nError: all is well.scene"
    result = CliRunner().invoke(cli, ["show", str(missing)])
    _one_error(result, 2, "a\\x1b[2Jb\\nError: all is well.scene")  # one line: no forged second one
    assert "\x1b" not in result.output
    for tty in (False, True):  # a terminal gets rich's colours; the message's own markup is text
        out = StringIO()
        reporter = ConsoleReporter(stream=out)
        reporter.console, reporter.tty = Console(file=out, force_terminal=tty, highlight=False, soft_wrap=True), tty
        reporter(Message("scene [link=https://evil.example]x[/link] says \x1b]0;pwned\x07", "warning"))
        reporter(Message("base \x1b[2J model\nsecond line"))
        text = out.getvalue()
        assert "[link=https://evil.example]x[/link]" in text and "\\x1b]0;pwned\\x07" in text and "\x1b]0;" not in text
        assert "base \\x1b[2J model\nsecond line" in text and "\x1b[2J" not in text


def test_show_of_a_scene_without_a_name_or_lora_settings(world):
    """The name is optional (a scene is named by its file), and a standalone LoRA scene
    needs no settings to be shown: show stopped with KeyError / AttributeError."""
    for meta in (lambda m: m.pop("name") and None, lambda m: m.update(tuning="lora", standalone=True, lora=None)):
        result = CliRunner().invoke(cli, ["show", _crafted(world, "shown", meta=meta)])
        assert result.exit_code == 0, result.output
        assert "scene:       shown" in result.stdout or "tuning: lora" in result.stdout


def test_rm_removes_a_damaged_scene_in_the_cache_and_says_each_deletion(world, monkeypatch):
    """A damaged file in the scene cache (listed as unreadable) could not be removed with
    rm; a file elsewhere still has to be a scene. Each deletion is printed as it happens."""
    scenes = world["home"] / "scenes"
    (scenes / "broken.scene").write_bytes(b"not a scene")
    result = CliRunner().invoke(cli, ["rm", "broken"])
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [str(scenes / "broken.scene")] and not (scenes / "broken.scene").exists()
    (world["tmp"] / "broken.scene").write_bytes(b"not a scene")
    _one_error(CliRunner().invoke(cli, ["rm", str(world["tmp"] / "broken.scene")]), 2, "truncated or corrupt")
    assert (world["tmp"] / "broken.scene").exists()

    # The second deletion fails (a read-only folder): the first is on stdout all the same.
    import pathlib

    real_unlink = pathlib.Path.unlink

    def unlink(self, *args, **kwargs):
        if self.name == "good.scene":
            raise PermissionError(13, "Permission denied", str(self))
        return real_unlink(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "unlink", unlink)
    result = CliRunner().invoke(cli, ["rm", "cached", str(world["scene"])])
    assert result.exit_code == 1 and result.stdout.splitlines() == [str(scenes / "cached.scene")], result.output
    # (in words, not "[Errno 13] Permission denied: ...")
    assert f"Error: cannot delete {world['scene']}: its folder {world['scene'].parent} is not writable by you" \
        in result.stderr, result.stderr


def test_list_shows_every_other_scene_when_one_fails_unforeseen(world, monkeypatch):
    import scenebreak.scenes.catalog as catalog

    real = catalog.read_metadata
    (world["home"] / "scenes" / "odd.scene").write_bytes(world["scene"].read_bytes())
    monkeypatch.setattr(catalog, "read_metadata", lambda path: (_ for _ in ()).throw(KeyError("lora"))
                        if path.stem == "odd" else real(path))
    result = CliRunner().invoke(cli, ["list"])
    assert result.exit_code == 0, result.output
    rows = {line.split("\t")[0]: line for line in result.stdout.splitlines()}
    assert "<asset1>" in rows["cached"] and "unreadable" in rows["odd"]


def test_a_scene_tokenizer_config_cannot_name_other_files(world, tmp_path):
    """On transformers 4.x a vocab_file / tokenizer_file key would be read instead of the
    scene's own files: such keys are dropped before the tokenizer is built."""
    from scenebreak.scenes.bundle import _without_code_references

    data = json.dumps({"vocab_file": "/etc/passwd", "tokenizer_file": "/dev/zero", "merges_file": "/x", "model_max_length": 77})
    assert json.loads(_without_code_references(data.encode(), "tokenizer_config.json")) == {"model_max_length": 77}

    def hostile(config):
        config.update(vocab_file=str(tmp_path / "nowhere.json"), tokenizer_file=str(tmp_path / "nowhere"))

    scene = craft(world["scene"], tmp_path / "files-tok.scene", tensors=_tokenizer_config(hostile)(world["scene"]))
    result = CliRunner().invoke(cli, ["generate", str(scene), "<asset1>", "--steps", "1", "--seed", "0", "--out-dir",
                                      str(tmp_path / "out")])
    assert result.exit_code == 0, result.output


def test_a_scene_config_cannot_choose_an_attention_kernel(world, tmp_path, monkeypatch):
    """transformers fetches and runs a hub kernel named by attn_implementation: a scene's
    configs only size its models, so the key is dropped."""
    import scenebreak.sample.scene_models as scene_models

    built = []
    real = scene_models.own_weights

    def own_weights(scene, dtype):
        models = real(scene, dtype)
        built.extend(te.config._attn_implementation for te in models[2])
        return models

    monkeypatch.setattr(scene_models, "own_weights", own_weights)
    scene = _crafted(world, "kernel", meta=set_meta("configs.text_encoder.attn_implementation", "kernels-community/evil"))
    result = CliRunner().invoke(cli, ["generate", scene, "<asset1>", "--steps", "1", "--seed", "0", "--out-dir",
                                      str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert built and all(implementation != "kernels-community/evil" for implementation in built)


def test_a_scene_alone_downloads_only_a_known_base_model(world, monkeypatch):
    """A LoRA scene names its base model, and a stranger's could name any model of any
    size: one not in the cache is downloaded only when the user names it too."""
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    from scenebreak.errors import ModelNotAvailable
    from scenebreak.scenes.bundle import load_scene
    from scenebreak.sample.scene_models import scene_base_model

    downloads = []

    def snapshot_download(ref, revision=None, allow_patterns=None, local_files_only=False):
        if local_files_only:
            raise LocalEntryNotFoundError("not in the cache")
        downloads.append(ref)
        raise OSError("no network in the tests")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    scene = load_scene(world["scene"])
    scene.meta["base_model"]["id"] = "stranger/huge-lookalike"
    with pytest.raises(ModelNotAvailable, match="pass --base-model stranger/huge-lookalike to download it"):
        scene_base_model(scene, None, "LoRA scene 'x'", "its LoRA adapters")
    assert downloads == []
    for named, asked in (("stabilityai/stable-diffusion-xl-base-1.0", None), ("stranger/huge-lookalike", "stranger/huge-lookalike")):
        scene.meta["base_model"]["id"] = named
        with pytest.raises(ModelNotAvailable, match="could not be downloaded"):
            scene_base_model(scene, asked, "LoRA scene 'x'", "its LoRA adapters")
    assert downloads == ["stabilityai/stable-diffusion-xl-base-1.0", "stranger/huge-lookalike"]


@pytest.mark.parametrize("commit, revision, looked_up, downloaded", [
    ("c" * 40, None, "c" * 40, None),  # the commit from the cache; the default branch downloaded
    ("c" * 40, "fp16", "c" * 40, "fp16"),  # a plain branch name it was learned at
    ("c" * 40, "refs/pr/7", "c" * 40, None),  # a pull request (anyone's) is never downloaded on the scene's word
    ("refs/pr/7", "../../etc", None, None),  # neither is a ref or a path where a commit belongs
])
def test_a_scene_alone_downloads_a_known_base_at_its_default_or_recorded_branch_only(world, monkeypatch, commit,
                                                                                     revision, looked_up, downloaded):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    from scenebreak.errors import ModelNotAvailable
    from scenebreak.scenes.bundle import load_scene
    from scenebreak.sample.scene_models import scene_base_model

    calls = []

    def snapshot_download(ref, revision=None, allow_patterns=None, local_files_only=False):
        calls.append(("cache" if local_files_only else "download", revision))
        if local_files_only:
            raise LocalEntryNotFoundError("not in the cache")
        raise OSError("no network in the tests")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    scene = load_scene(world["scene"])
    scene.meta["base_model"].update(id="stabilityai/stable-diffusion-xl-base-1.0", commit=commit, revision=revision)
    with pytest.raises(ModelNotAvailable, match="could not be downloaded"):
        scene_base_model(scene, None, "LoRA scene 'x'", "its LoRA adapters")
    assert calls[0] == ("cache", looked_up) and calls[-1] == ("download", downloaded), calls


def test_a_scene_naming_a_base_on_a_network_share_is_refused_unopened(world, monkeypatch):
    """On Windows, looking at \\\\host\\share sends the user's credentials to the host."""
    from pathlib import Path

    from scenebreak.scenes.bundle import load_scene
    from scenebreak.sample.scene_models import scene_base_model

    scene = load_scene(world["scene"])
    opened = []
    monkeypatch.setattr(Path, "exists", lambda self: opened.append(self) or False)
    monkeypatch.setattr(Path, "is_dir", lambda self: opened.append(self) or False)
    for share in ("\\\\evil.example\\sd\\model", "//evil.example/sd/model"):
        scene.meta["base_model"]["id"] = share
        with pytest.raises(BundleError, match="network share"):
            scene_base_model(scene, None, "LoRA scene 'x'", "its LoRA adapters")
    assert opened == []


def test_a_lora_scene_tokenizer_cannot_size_the_text_encoder(world, tmp_path):
    """The base's token table is resized to the scene tokenizer's length: a tokenizer of
    millions of tokens would have made a table of gigabytes. Only its handles are new."""
    from scenebreak import LearnConfig, learn
    from scenebreak.scenes.bundle import load_scene
    from scenebreak.sample.scene_models import base_with_lora

    lora = learn(world["image"], world["masks"], LearnConfig(steps1=1, steps2=1, prior=False, tune="lora", rank=2),
                 base_model=str(world["model"]), output=tmp_path / "lora.scene")
    scene = load_scene(lora.path, weights=True)
    from transformers import CLIPTextConfig

    rows = CLIPTextConfig.from_pretrained(world["model"] / "text_encoder").vocab_size
    with pytest.raises(BundleError, match="more than its base model's text encoder"):
        base_with_lora(scene, None, [rows + 10**6])
    assert base_with_lora(scene, None, [rows + 2])[2][0].get_input_embeddings().weight.shape[0] == rows + 2


def test_a_model_download_is_announced_before_it_starts(world, monkeypatch):
    """The hub's bars are off (they churn in logs), and nothing was said: a `mask` or
    `evaluate` on a fresh machine sat silent for the minutes its models took."""
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    from scenebreak.errors import ModelNotAvailable
    from scenebreak.events import Message
    from scenebreak.hub import downloads_reported, hub_snapshot

    def snapshot_download(ref, revision=None, allow_patterns=None, local_files_only=False):
        if local_files_only:
            raise LocalEntryNotFoundError("not in the cache")
        raise OSError("no network in the tests")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    said = []
    with downloads_reported(said.append):
        for patterns in (["*.json"], ["*.safetensors"]):  # a base model's configs, then its weights: said once
            with pytest.raises(ModelNotAvailable):
                hub_snapshot("someone/model", None, patterns)
    assert [m.text for m in said if isinstance(m, Message)] == [
        "downloading the base model someone/model from the Hugging Face hub (once: it stays in its cache; this can "
        "take minutes)"]
    result = CliRunner().invoke(cli, ["mask", str(world["image"]), "-p", "cat"])  # the CLI's reporter hears it
    assert "downloading the detector IDEA-Research/grounding-dino-tiny" in result.stderr, result.output


def test_a_download_reports_its_bytes_and_files_as_progress(tmp_path, monkeypatch):
    """After the announcement nothing came, for the gigabytes of a first run: no count,
    no rate, no sign of a stall. The hub's bars (ours to draw) now report, as the hub
    builds and drives them (huggingface_hub 2.x: a bytes bar, and its files' thread map)."""
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError
    from tqdm.contrib.concurrent import thread_map

    from scenebreak.events import Progress
    from scenebreak.hub import downloads_reported, hub_snapshot

    def snapshot_download(ref, revision=None, allow_patterns=None, local_files_only=False, tqdm_class=None):
        if local_files_only:
            raise LocalEntryNotFoundError("not in the cache")
        (tmp_path / "snap").mkdir(exist_ok=True)
        if tqdm_class is None:  # (the hub's own bars, which quiet_libraries turns off)
            return str(tmp_path / "snap")
        transfer = tqdm_class(desc="Downloading bytes", total=0, initial=0, unit="B", unit_scale=True,
                              bar_format="{desc}: {n_fmt}")
        transfer.total = 3 << 20
        # hf_xet's second bar over the same bytes, as it puts the files together: each
        # line was said twice (and a smaller total first).
        rebuild = tqdm_class(desc="Reconstructing", total=2 << 20, unit="B", unit_scale=True)
        for _ in range(3):
            transfer.update(1 << 20)
            rebuild.update(1 << 19)
        transfer.close()
        rebuild.close()
        thread_map(lambda name: name, ["a.json", "b.safetensors"], desc="Fetching 2 files", tqdm_class=tqdm_class)
        return str(tmp_path / "snap")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    said = []
    with downloads_reported(said.append):
        hub_snapshot("someone/model", None, ["*.json"])
    progress = [(e.task, e.completed, e.total) for e in said if isinstance(e, Progress)]
    assert ("download (MB)", 3, 3) in progress and ("download (files)", 2, 2) in progress, progress
    assert [p for p in progress if p[0] == "download (MB)"] == [("download (MB)", n, 3) for n in (1, 2, 3)], progress
    assert hub_snapshot("someone/model", None, ["*.json"])  # (no reporter: no bar)


def test_an_output_path_that_is_not_utf8_prints_as_its_bytes(world, tmp_path):
    """`--out-dir $'out\\xff'`: the images were written, then printing their paths failed
    (UnicodeEncodeError, exit 1) and scripts never got them."""
    import os

    out = tmp_path / os.fsdecode(b"out\xff")
    result = CliRunner().invoke(cli, ["generate", str(world["scene"]), "<asset1>", "--steps", "1", "--out-dir", str(out)])
    assert result.exit_code == 0, result.output
    [line] = result.stdout_bytes.splitlines()
    assert line.startswith(os.fsencode(str(out))) and os.path.isfile(line)


def test_text_stdout_cannot_encode_is_written_as_escapes_not_a_failure(world):
    """Redirected on Windows, stdout encodes in the ANSI code page: `show` of a scene whose
    base model lives under a Chinese folder name failed with UnicodeEncodeError (here
    stdout is made Latin-1 to show it: a code page, as cp1252 is; Click takes plain ASCII
    for a misconfigured system and writes UTF-8 instead)."""
    craft(world["scene"], world["home"] / "scenes" / "far.scene", meta=set_meta("base_model.id", "/模型/sd"))
    env = dict(os.environ, PYTHONIOENCODING="latin-1", PYTHONPATH=os.pathsep.join(sys.path))
    shown = subprocess.run([sys.executable, "-m", "scenebreak", "show", "far"], env=env, capture_output=True)
    assert shown.returncode == 0, shown.stderr
    assert b"/\\u6a21\\u578b/sd" in shown.stdout
