"""One source for every setting: each command-line option takes its default (and its
choices and help) from the config field or the library function it feeds."""

from __future__ import annotations

import dataclasses
import inspect

import click
import numpy as np
import pytest

from scenebreak.cli.commands import cli
from scenebreak.config import BackgroundConfig, EditConfig, EvaluateConfig, GenerateConfig, LearnConfig, MaskConfig


def _library():
    from scenebreak.sample.edit import edit, extract_background
    from scenebreak.evaluation.evaluate import evaluate
    from scenebreak.exports.export import export_scene
    from scenebreak.sample.generate import generate
    from scenebreak.train.learn import learn
    from scenebreak.masks.masking import make_masks

    return {
        "learn": (LearnConfig, learn), "generate": (GenerateConfig, generate), "edit": (EditConfig, edit),
        "extract-bg": (BackgroundConfig, extract_background), "mask": (MaskConfig, make_masks), "export": (None, export_scene),
        "evaluate": (EvaluateConfig, evaluate),
    }


# Options that only shape what the command prints or reads, with no library counterpart;
# and edit's --mask/--prompt pairs, which become its `regions`.
CLI_ONLY = {"quiet", "json_", "prompts_file", "prompt_options", "masks"}
# extract-bg's -n counts background variations (a function argument), not images per prompt.
NO_OPTION = {"extract-bg": {"num_images"}}


def _default(value):
    return None if value in ((), []) else value


@pytest.mark.parametrize("command", ["learn", "generate", "edit", "extract-bg", "mask", "export", "evaluate"])
def test_every_option_default_is_the_api_default(command):
    config_class, function = _library()[command]
    fields = {f.name: f for f in dataclasses.fields(config_class)} if config_class else {}
    signature = inspect.signature(function).parameters
    options = [p for p in cli.commands[command].params if isinstance(p, click.Option)]
    # What the command receives when every option is left out.
    received = cli.commands[command].make_context(command, [], resilient_parsing=True).params
    for option in options:
        given = received[option.name]
        if option.name in fields:
            f = fields[option.name]
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            assert _default(given) == default, (command, option.name)
            if f.metadata.get("choices"):
                assert list(option.type.choices) == list(f.metadata["choices"]), (command, option.name)
            if f.metadata["cli"]:  # mask's device comes from the shared --device option
                assert option.help == f.metadata["help"], (command, option.name)
        elif option.name in signature:
            api = signature[option.name].default
            if api is inspect.Parameter.empty:
                assert option.required, (command, option.name)
            else:
                assert _default(given) == _default(api), (command, option.name)
        else:
            assert option.name in CLI_ONLY, f"{command} --{option.name} feeds neither a config field nor {function.__name__}()"
    if config_class:
        default_config = signature["config"].default
        assert default_config is None or default_config == config_class(), command
        names = {o.name for o in options}
        missing = [f for f in fields.values() if f.metadata.get("cli") and f.name not in names | NO_OPTION.get(command, set())]
        assert not missing, f"{command} has no option for {[f.name for f in missing]}"
        assert all(f.name not in names for f in fields.values() if not f.metadata.get("cli") and f.name != "device")


def test_python_only_settings_have_no_option():
    learn = {p.name for p in cli.commands["learn"].params}
    assert {"prior_weight", "adam_betas", "optimizer_in_backward", "flip_p"}.isdisjoint(learn)


def test_switch_pairs_reach_the_config():
    """A field that is on by default gets an --x/--no-x pair; the CLI's parse gives the
    same config the API's constructor does."""
    from click.testing import CliRunner

    from scenebreak.cli import commands as cli_module

    seen = {}

    def fake_learn(image, masks, config, **kwargs):
        seen["config"] = config
        raise SystemExit(0)

    import scenebreak.train.learn

    original = scenebreak.train.learn.learn
    scenebreak.train.learn.learn = fake_learn
    try:
        CliRunner().invoke(cli_module.cli, ["learn", "x.png", "--masks", "a.png", "b.png", "--no-prior", "--names", "a", "b",
                                            "--checkpoint-every", "7"])
    finally:
        scenebreak.train.learn.learn = original
    assert seen["config"] == LearnConfig(prior=False, names=("a", "b"), checkpoint_every=7)


def test_a_bad_number_is_refused_before_any_work(tmp_path):
    from scenebreak.errors import InvalidInput

    with pytest.raises(InvalidInput, match="finite"):
        LearnConfig(lr1=float("nan")).validate(1)
    with pytest.raises(InvalidInput, match="finite"):
        LearnConfig(lambda_attn=float("inf")).validate(1)


def test_every_numeric_option_has_a_bound_the_api_checks_too():
    """A number from the command line is checked as it is parsed (exit 2 before any
    work), and the same bound holds for the Python API."""
    from scenebreak.errors import InvalidInput

    for config_class in (LearnConfig, GenerateConfig, EditConfig, BackgroundConfig, MaskConfig, EvaluateConfig):
        for f in dataclasses.fields(config_class):
            if str(f.type).split("|")[0].strip() in ("int", "float"):
                bounds = f.metadata.get("bounds")
                assert bounds is not None, f"{config_class.__name__}.{f.name} has no bounds"
                with pytest.raises(InvalidInput, match=f"--{f.name.replace('_', '-')}"):
                    config = config_class(**{f.name: type(f.default or 0)(bounds.high * 2 + 1)})
                    config.validate(1) if config_class is LearnConfig else config.validate()


def test_the_most_handles_learn_takes_all_fit_the_training_prompt(tiny_model):
    from transformers import CLIPTokenizer

    from scenebreak.config import MAX_LEARNED_HANDLES
    from scenebreak.errors import InvalidInput
    from scenebreak.handles import prompt_for
    from scenebreak.train.tokens import handle_positions

    tokenizer = CLIPTokenizer.from_pretrained(tiny_model / "tokenizer")
    for n in (MAX_LEARNED_HANDLES, MAX_LEARNED_HANDLES + 1):
        tokens = [f"<h{i}>" for i in range(n)]
        tokenizer.add_tokens([t for t in tokens if t not in tokenizer.get_vocab()])
        ids = tokenizer(prompt_for(tokens), padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids[0]
        if n == MAX_LEARNED_HANDLES:
            assert len(handle_positions(ids, tokenizer.convert_tokens_to_ids(tokens))) == n
        else:
            with pytest.raises(ValueError):  # the last handle was cut: why learn refuses this many
                handle_positions(ids, tokenizer.convert_tokens_to_ids(tokens))
    LearnConfig().validate(MAX_LEARNED_HANDLES)
    with pytest.raises(InvalidInput, match=f"at most {MAX_LEARNED_HANDLES}"):
        LearnConfig(background=True).validate(MAX_LEARNED_HANDLES)


def test_pythons_spellings_of_one_setting_resume_as_one():
    """A resume compares the settings as written: `lambda_attn=0` and `0.0`, a list and
    a tuple, must be the same run."""
    from types import SimpleNamespace

    from scenebreak.train.checkpoints import identity

    prepared = SimpleNamespace(source_sha256="s", masks=np.zeros(2, np.uint8))
    one = LearnConfig(lambda_attn=0, lr1=1, adam_betas=[0.9, 0.99], names=["cat", "dog"], steps1=3)
    other = LearnConfig(lambda_attn=0.0, lr1=1.0, adam_betas=(0.9, 0.99), names=("cat", "dog"), steps1=3)
    assert identity(prepared, one, "base") == identity(prepared, other, "base")
    assert isinstance(one.steps1, int) and one.prior is True  # ints and flags stay as they are
    assert identity(prepared, one, "base") != identity(prepared, LearnConfig(lambda_attn=0.5), "base")


def test_a_whole_numbers_bounds_are_said_in_digits():
    """`--seed -1` said "at most 9.22337e+18": the bound a user must stay under, rounded."""
    from scenebreak.config import MAX_SEED, Bounds

    assert Bounds(0, MAX_SEED).describe(-1) == "must be at least 0 and at most 9223372036854775807, not -1"
    assert Bounds(0.0, 1.0).describe(2.5) == "must be at least 0 and at most 1, not 2.5"


def test_a_class_prompt_with_a_handle_or_none_at_all_is_refused():
    """A handle in it was taken: the class images came from the base, which reads it as
    pieces of words, and the prior loss then pulled the handle towards them. An empty
    one made unconditional class images."""
    from scenebreak.errors import InvalidInput

    with pytest.raises(InvalidInput, match="--class-prompt 'a photo of <asset1>' names <asset1>"):
        LearnConfig(class_prompt="a photo of <asset1>").validate(2)
    with pytest.raises(InvalidInput, match="--class-prompt is empty"):
        LearnConfig(class_prompt="  ").validate(2)
    LearnConfig(class_prompt="  ", prior=False).validate(2)  # (unused: the command line warns of it)
    LearnConfig(class_prompt="a photo of a dog").validate(2)
