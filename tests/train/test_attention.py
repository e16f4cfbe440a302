import pytest
import torch

from scenebreak.families.unet import cross_attention_layers
from scenebreak.train.attention import AttentionStore, RecordingAttnProcessor, capture_cross_attention
from scenebreak.errors import InvalidInput

from tinymodels import sd21_base_configs


def _unet(config):
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    with init_empty_weights():
        return UNet2DConditionModel(**config)


def test_sd21_base_captures_exactly_the_five_16x16_cross_attention_layers():
    names = cross_attention_layers(_unet(sd21_base_configs()["unet"]))
    assert sorted(names) == sorted(
        [f"down_blocks.2.attentions.{i}.transformer_blocks.0.attn2.processor" for i in range(2)]
        + [f"up_blocks.1.attentions.{i}.transformer_blocks.0.attn2.processor" for i in range(3)]
    )


def test_a_unet_without_layers_at_latent_over_4_is_a_clear_error():
    config = dict(sd21_base_configs()["unet"], block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=(2, 4), layers_per_block=1)
    with pytest.raises(InvalidInput, match="latent size / 4"):
        cross_attention_layers(_unet(config))


def _tiny_unet(tiny_model):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(tiny_model / "unet")


def test_capture_records_only_chosen_layers_and_restores_processors(tiny_model):
    unet = _tiny_unet(tiny_model)
    before = {k: type(v) for k, v in unet.attn_processors.items()}
    store = AttentionStore()
    layers = cross_attention_layers(unet)
    with pytest.raises(RuntimeError, match="boom"):
        with capture_cross_attention(unet, store, layers):
            recording = [k for k, v in unet.attn_processors.items() if isinstance(v, RecordingAttnProcessor)]
            assert sorted(recording) == sorted(layers)
            raise RuntimeError("boom")
    assert {k: type(v) for k, v in unet.attn_processors.items()} == before


def test_recording_matches_fused_attention_and_keeps_the_instance_only(tiny_model):
    unet = _tiny_unet(tiny_model)
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 32, 32, generator=g)
    text = torch.randn(2, 77, 32, generator=g)
    t = torch.tensor([10, 500])
    with torch.no_grad():
        fused = unet(latents, t, text).sample
        store = AttentionStore(example=0)
        with capture_cross_attention(unet, store, cross_attention_layers(unet)):
            recorded = unet(latents, t, text).sample
            both = dict(store.maps)
            store.clear()
            # the class image (row 1) changes: the instance's maps must not
            other = latents.clone()
            other[1] = torch.randn(4, 32, 32, generator=g)
            unet(other, t, text)
            assert all(torch.allclose(both[k], store.maps[k]) for k in both)
            store.clear()
            # a second forward (as in a checkpointing recompute) replaces, never appends
            unet(latents, t, text)
            unet(latents, t, text)
            assert len(store.maps) == len(both)
    assert torch.allclose(fused, recorded, atol=1e-5)
    for probs in both.values():
        assert probs.shape[0] == unet.config.attention_head_dim[-1] or probs.ndim == 3
        assert torch.allclose(probs.sum(-1), torch.ones(()), atol=1e-5)


@pytest.mark.parametrize("model", ["tiny_model", "tiny_sdxl"])
def test_recording_only_the_handle_columns_gives_the_full_maps_and_gradients(model, request):
    """The trainer records only the handles' columns (exp(s_j - logsumexp(s))) next to
    the fused block output: the maps, the loss's gradient and the UNet output must be
    those of the whole softmax."""
    from diffusers import UNet2DConditionModel

    folder = request.getfixturevalue(model)
    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    width = unet.config.cross_attention_dim
    g = torch.Generator().manual_seed(0)
    latents, t = torch.randn(2, 4, 32, 32, generator=g), torch.tensor([10, 500])
    added = None
    if unet.config.addition_embed_type == "text_time":
        pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        added = {"text_embeds": torch.randn(2, pooled, generator=g), "time_ids": torch.tensor([[256.0, 256, 0, 0, 256, 256]] * 2)}
    text = torch.randn(2, 77, width, generator=g)
    positions = [5, 2]
    results = []
    for columns in (None, positions):
        embeds = text.clone().requires_grad_(True)
        store = AttentionStore(0)
        store.columns = columns
        with capture_cross_attention(unet, store, cross_attention_layers(unet)):
            out = unet(latents, t, embeds, added_cond_kwargs=added).sample
            maps = store.token_maps(positions)
        (grad,) = torch.autograd.grad((maps * torch.linspace(0, 1, maps.numel()).view_as(maps)).sum(), embeds)
        results.append((out.detach(), maps.detach(), grad, {k: v.shape for k, v in store.maps.items()}))
    (out_all, maps_all, grad_all, shapes_all), (out_cols, maps_cols, grad_cols, shapes_cols) = results
    assert torch.allclose(out_all, out_cols) and torch.allclose(maps_all, maps_cols, atol=1e-6)
    error = (grad_all - grad_cols).abs().max() / grad_all.abs().max()
    assert error < 1e-4 and grad_all.abs().sum() > 0, error  # fp32 round-off
    assert all(shape[-1] == 77 for shape in shapes_all.values()) and all(shape[-1] == 2 for shape in shapes_cols.values())
    with pytest.raises(RuntimeError, match="other token positions"):
        store.token_maps([1, 2])


def test_sdxl_captures_its_latent_over_4_layers_with_every_transformer_layer():
    """SDXL at 1024: maps at 32x32 in the down block with 10 transformer layers per
    attention (2 attentions), the mid block (10) and the matching up block (3 x 10)."""
    from tinymodels import sdxl_configs

    names = cross_attention_layers(_unet(sdxl_configs()["unet"]))
    assert len(names) == 2 * 10 + 10 + 3 * 10
    assert {n.split(".")[0] for n in names} == {"down_blocks", "mid_block", "up_blocks"}
    assert all(n.startswith(("down_blocks.2.", "mid_block.", "up_blocks.0.")) for n in names)
