"""The maps the attention loss reads in FLUX's joint attention (RecordingJointAttnProcessor),
in each form, against the attention written out by hand: the block outputs stay
diffusers' own, the recorded maps and their gradients are those of the materialised
softmax, and they land on the token grid as the masks are downsampled."""

from __future__ import annotations

import pytest
import torch

from scenebreak.families.flux import FLUX_DEV, Flux, image_ids, text_ids
from scenebreak.train.attention import FORMS, AttentionStore, capture_cross_attention, joint_columns
from scenebreak.train.losses import downsample_masks

from tinymodels import sharpen_joint_attention, tiny_flux_configs

TEXT, PROMPT = 12, 7  # T5 tokens of the example (padding included), the prompt's own (up to </s>)
LATENT = 16  # latent side: 8x8 tokens


def _transformer(double_blocks: int = 2):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    model = FluxTransformer2DModel(**dict(tiny_flux_configs()["transformer"], num_layers=double_blocks))
    sharpen_joint_attention(model, 2.0)  # as the tiny FLUX: maps far from uniform
    return model.eval()


def _inputs(batch: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(batch, (LATENT // 2) ** 2, 64, generator=g),
                encoder_hidden_states=torch.randn(batch, TEXT, 32, generator=g),
                pooled_projections=torch.randn(batch, 32, generator=g), timestep=torch.tensor([0.3, 0.8])[:batch],
                guidance=torch.full((batch,), 1.0), txt_ids=text_ids(TEXT), img_ids=image_ids((LATENT, LATENT)),
                return_dict=False)


class Materialised:
    """FluxAttnProcessor's attention written out: the whole joint softmax over text and
    image keys, and the output as probabilities times values; keeps, per block, the
    logits and the outputs before the output projections."""

    def __init__(self, kept: dict, name: str):
        self.kept, self.name = kept, name

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        from diffusers.models.embeddings import apply_rotary_emb

        def heads(x):
            return x.unflatten(-1, (-1, attn.head_dim))

        text = encoder_hidden_states.shape[1]
        query = torch.cat([attn.norm_added_q(heads(attn.add_q_proj(encoder_hidden_states))),
                           attn.norm_q(heads(attn.to_q(hidden_states)))], dim=1)
        key = torch.cat([attn.norm_added_k(heads(attn.add_k_proj(encoder_hidden_states))),
                         attn.norm_k(heads(attn.to_k(hidden_states)))], dim=1)
        value = torch.cat([heads(attn.add_v_proj(encoder_hidden_states)), heads(attn.to_v(hidden_states))], dim=1)
        query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1).transpose(1, 2)
        key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1).transpose(1, 2)
        logits = query @ key.transpose(-1, -2) / attn.head_dim ** 0.5  # batch, heads, sequence, sequence
        out = (logits.softmax(dim=-1) @ value.transpose(1, 2)).transpose(1, 2).flatten(2, 3)
        self.kept[self.name] = {"logits": logits, "out": out, "text": text}
        return attn.to_out[1](attn.to_out[0](out[:, text:])), attn.to_add_out(out[:, :text])


def _reference(kept: dict, form: str, example: int, columns) -> dict:
    """The maps of each form from the materialised attention (heads, pixels, columns)."""
    maps = {}
    for name, k in kept.items():
        logits, out, text = k["logits"][example], k["out"][example], k["text"]
        if form == "text":
            probs = logits[:, text:, :PROMPT].softmax(dim=-1)
        elif form == "joint":
            probs = logits.softmax(dim=-1)[:, text:, :PROMPT]
        else:
            probs = (out[text:] @ out[:PROMPT].T).softmax(dim=-1)[None]
        maps[name] = probs if columns is None else probs[..., columns]
    return maps


def _run(model, processor, inputs):
    layers = [f"transformer_blocks.{i}.attn.processor" for i in range(len(model.transformer_blocks))]
    original = dict(model.attn_processors)
    model.set_attn_processor({n: processor(n) if n in layers else p for n, p in original.items()})
    try:
        return model(**inputs)[0]
    finally:
        model.set_attn_processor(original)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("columns", [None, [2, 5]])
def test_recorded_maps_and_their_gradients_are_the_materialised_softmax(form, columns):
    model = _transformer()
    layers = Flux(FLUX_DEV).attention_layers(model)
    assert layers == ["transformer_blocks.0.attn.processor", "transformer_blocks.1.attn.processor"]
    text = _inputs()["encoder_hidden_states"].requires_grad_(True)
    with torch.no_grad():
        diffusers_out = model(**_inputs())[0]  # FluxAttnProcessor everywhere

    kept = {}
    reference_out = _run(model, lambda n: Materialised(kept, n), dict(_inputs(), encoder_hidden_states=text))
    store = AttentionStore(example=1, form=form)
    store.columns, store.text_length = columns, PROMPT
    with capture_cross_attention(model, store, layers, kind="joint"):
        recorded_out = model(**dict(_inputs(), encoder_hidden_states=text))[0]

    # The block outputs are diffusers' own, and so are the written-out attention's.
    torch.testing.assert_close(recorded_out, diffusers_out, rtol=0, atol=1e-5)
    torch.testing.assert_close(reference_out, diffusers_out, rtol=0, atol=1e-5)
    reference = _reference(kept, form, 1, columns)
    assert set(store.maps) == set(reference) == set(layers)
    for name in layers:
        assert store.maps[name].shape == reference[name].shape
        torch.testing.assert_close(store.maps[name], reference[name], rtol=1e-5, atol=1e-7)
        assert reference[name].std() > 1e-3  # not uniform: the comparison can fail

    # Gradients of a loss on the handles' maps with respect to the text, through every block.
    positions = columns or [2, 5]
    weights = torch.randn(2, LATENT // 2, LATENT // 2, generator=torch.Generator().manual_seed(1))
    maps = store.token_maps(positions)
    assert maps.shape == (2, LATENT // 2, LATENT // 2)
    expected = torch.stack([m[..., positions if columns is None else [0, 1]].mean(0) for m in reference.values()])
    expected = expected.mean(0).transpose(0, 1).reshape(2, LATENT // 2, LATENT // 2)
    torch.testing.assert_close(maps, expected, rtol=1e-5, atol=1e-7)
    [grad] = torch.autograd.grad((maps * weights).sum(), text)
    [grad_reference] = torch.autograd.grad((expected * weights).sum(), text)
    assert grad[1].abs().sum() > 0 and grad[0].abs().sum() == 0  # only the kept example's maps
    torch.testing.assert_close(grad, grad_reference, rtol=1e-4, atol=1e-6 * grad_reference.abs().max().item())


def test_joint_columns_in_chunks_of_the_head_dimension_are_the_softmax_columns():
    g = torch.Generator().manual_seed(0)
    query, key = torch.randn(2, 9, 8, generator=g) * 2, torch.randn(2, 30, 8, generator=g) * 2
    columns = [0, 3, 4, 7, 8, 11, 12, 13, 17, 20, 21, 29]  # more than one chunk of 8
    probs = (query @ key.transpose(-1, -2) / 8 ** 0.5).softmax(dim=-1)
    torch.testing.assert_close(joint_columns(query, key, columns), probs[..., columns], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("form", FORMS)
def test_maps_land_on_the_token_grid_where_the_downsampled_mask_is(form):
    """Latents with other content in an off-centre rectangle than elsewhere: with the
    rotary dimensions of every query and key switched off, a map depends on content
    alone, so it takes one value inside the rectangle and another outside, and the
    cells that differ are the rectangle's mask downsampled to the map's size."""
    model = _transformer()
    with torch.no_grad():
        rotary = slice(tiny_flux_configs()["transformer"]["axes_dims_rope"][0], None)  # axis 0 is 0 for every token
        for name, module in model.named_modules():
            if name.endswith(("norm_q", "norm_k", "norm_added_q", "norm_added_k")):
                module.weight[rotary] = 0
    family = Flux(FLUX_DEV)
    g = torch.Generator().manual_seed(2)
    latents = torch.randn(1, 16, 1, 1, generator=g).expand(1, 16, LATENT, LATENT).clone()
    latents[:, :, 4:12, 8:16] = torch.randn(1, 16, 1, 1, generator=g)  # latent rows 4-11, columns 8-15
    pixels = torch.zeros(1, 2 * LATENT, 2 * LATENT)
    pixels[:, 8:24, 16:32] = 1  # the same rectangle in the photo (the tiny VAE shrinks 2x)
    mask = downsample_masks(pixels, family.attention_size(LATENT))[0]
    assert mask.shape == (8, 8) and mask.sum() == 16 and mask[2:6, 4:8].all()

    store = AttentionStore(form=form)
    store.columns, store.text_length = [1, 3], PROMPT
    added = {"pooled_projections": torch.randn(1, 32, generator=g), "txt_ids": text_ids(TEXT), "guidance": torch.ones(1)}
    with torch.no_grad(), capture_cross_attention(model, store, family.attention_layers(model), kind="joint"):
        family.denoise(model, latents, torch.tensor([500.0]), torch.randn(1, TEXT, 32, generator=g), added)
    for token_map in store.token_maps([1, 3]):
        outside = token_map[0, 0]
        differs = (token_map - outside).abs() > 1e-3 * token_map.abs().max()
        assert torch.equal(differs, mask.bool()), (differs.int(), token_map)


def test_an_unknown_form_is_refused():
    with pytest.raises(ValueError, match="unknown attention map form 'softmax'"):
        AttentionStore(form="softmax")
