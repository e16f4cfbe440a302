"""Capturing the few cross-attention maps the attention loss needs.

Only the layers the family names (`Family.attention_layers`: on SD and SDXL the
cross-attention layers at latent size / 4, 16x16 for SD2.1-base at 512) get a
recording processor; every other layer keeps diffusers' fused scaled-dot-product
attention. Maps are kept in a dict keyed by layer name, so a
gradient-checkpointing recompute overwrites instead of appending twice.
"""

from __future__ import annotations

import contextlib

import torch

from ..device import autocast_off


# The forms of a FLUX map (RecordingJointAttnProcessor): "text", the image queries' softmax
# over the prompt's own text keys (a cross-attention map, as on SD; the default); "joint",
# the text columns of the joint softmax over all text and image keys (the probabilities
# the model uses); "output", ConceptAttention's output-space map (image outputs dotted
# with the prompt tokens' outputs, softmax over the prompt's tokens), kept for the
# measurements in docs/method.md, not advised as a loss.
FORMS = ("text", "joint", "output")


class AttentionStore:
    """Cross-attention probabilities of one example of the batch, per layer: of every
    token, or only of `columns` (the handles' positions) when the caller sets them
    before the forward pass, which is all the attention loss needs. `form` is the
    joint attention's map (FORMS); cross-attention has only one."""

    form: str = "text"  # the default for every store; benchmarks/attention_iou.py sets others

    def __init__(self, example: int = 0, form: str | None = None):
        self.example = example  # batch index whose maps are kept (the instance image)
        # Token positions to keep (None: all): a list, or a tensor of them (the trainer's,
        # always one per handle, so that every step has the same shapes).
        self.columns: list[int] | torch.Tensor | None = None
        self.text_length: int | None = None  # joint attention: the prompt's own tokens, the keys of its maps
        # Joint attention: added to the scores over those keys, -inf past the prompt's end, so
        # that text_length can be the longest prompt's for every step (None: no bias).
        self.key_bias: torch.Tensor | None = None
        if form is not None:
            if form not in FORMS:
                raise ValueError(f"unknown attention map form {form!r}: one of {', '.join(FORMS)}")
            self.form = form
        self.maps: dict[str, torch.Tensor] = {}

    def clear(self) -> None:
        self.maps.clear()

    def record(self, name: str, probs: torch.Tensor) -> None:
        # probs: (heads, pixels, tokens or len(columns)) of the kept example.
        self.maps[name] = probs

    def token_maps(self, positions: list[int]) -> torch.Tensor:
        """(len(positions), side, side): per token, the map averaged over heads and layers."""
        if not self.maps:
            raise RuntimeError("no attention maps were recorded this step")
        if self.columns is not None:
            if torch.is_tensor(self.columns) or list(positions) != list(self.columns):
                raise RuntimeError("the maps were recorded for other token positions")
            return self.recorded_maps()  # the maps hold exactly those columns
        return self._average([m[:, :, positions] for m in self.maps.values()])

    def recorded_maps(self) -> torch.Tensor:
        """(len(columns), side, side): the map of each recorded column, in their order,
        averaged over heads and layers."""
        if not self.maps:
            raise RuntimeError("no attention maps were recorded this step")
        return self._average(list(self.maps.values()))

    @staticmethod
    def _average(maps: list[torch.Tensor]) -> torch.Tensor:
        stacked = torch.stack([m.float().mean(0) for m in maps])  # layers, pixels, k
        mean = stacked.mean(0).transpose(0, 1)  # k, pixels
        side = int(round(mean.shape[1] ** 0.5))
        return mean.reshape(mean.shape[0], side, side)


class RecordingAttnProcessor:
    """Like diffusers' AttnProcessor2_0 (the block output comes from the same fused
    scaled-dot-product attention), and it also records the attention probabilities of
    one example, with their gradient, for the few columns the loss needs.

    The probabilities are never needed in full: softmax column j is exp(s_j - lse(s)),
    so only the example's scores (heads x pixels x 77) are computed, in fp32, for their
    log-sum-exp, and only the handles' columns are kept. On SDXL at 1024 this is a
    1024 x 77 matrix per head for one example instead of materialising the whole
    batch's attention, and the block output keeps the fused kernel."""

    def __init__(self, store: AttentionStore, name: str):
        self.store = store
        self.name = name

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        import torch.nn.functional as F

        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        batch = hidden_states.shape[0]
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        query = attn.to_q(hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        mask = None
        if attention_mask is not None:
            mask = attn.prepare_attention_mask(attention_mask, key.shape[2], batch)
            mask = mask.view(batch, attn.heads, -1, mask.shape[-1]).float()
        # Scores and softmax in fp32 here, whatever autocast says: q.k can pass fp16's
        # range before it is scaled (SD 2.x-768 sets upcast_attention for this very
        # reason), and half-precision softmax of sharp cross-attention blurs the very
        # maps the loss shapes (measured: the tiny model's handles then settle on the
        # wrong object more often). With 77 keys these few layers cost little in fp32.
        with autocast_off(query.device.type):
            out = F.scaled_dot_product_attention(query.float(), key.float(), value.float(), attn_mask=mask, dropout_p=0.0,
                                                 scale=attn.scale)

        # The recorded maps, for the kept example only.
        ex = self.store.example
        with autocast_off(query.device.type):
            scores = torch.matmul(query[ex].float() * attn.scale, key[ex].float().transpose(-1, -2))
            if mask is not None:
                scores = scores + mask[ex]
            columns = self.store.columns
            if columns is None:
                probs = scores.softmax(dim=-1)
            else:
                probs = (scores[..., columns] - scores.logsumexp(dim=-1, keepdim=True)).exp()
        self.store.record(self.name, probs)

        hidden_states = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def joint_columns(query, key, columns) -> torch.Tensor:
    """Columns of softmax(query key^T / sqrt(dim)) without the whole matrix: attention
    over one-hot values is the probability of each value's key, so the fused kernel
    (whose backward is exact) returns them, a head dimension of columns per call.
    query (heads, rows, dim), key (heads, keys, dim) -> (heads, rows, len(columns))."""
    import torch.nn.functional as F

    dim, parts = query.shape[-1], []
    for start in range(0, len(columns), dim):
        chunk = columns[start:start + dim]
        onehot = torch.zeros(key.shape[-2], dim, dtype=query.dtype, device=query.device)
        onehot[chunk, torch.arange(len(chunk), device=query.device)] = 1
        out = F.scaled_dot_product_attention(query, key, onehot.expand(key.shape[0], -1, -1))
        parts.append(out[..., :len(chunk)])
    return torch.cat(parts, dim=-1)


class RecordingJointAttnProcessor:
    """Like diffusers' FluxAttnProcessor for a double-stream block (the block output from
    the same fused attention over text and image tokens, text first), and it also
    records, for the kept example, how much each image token attends to the handles'
    text tokens, with their gradient, in the store's form (FORMS), in fp32:

    - "text": the softmax of the image queries over the prompt's own text tokens (the
      first `store.text_length` keys: the prompt up to its end-of-text token), a
      cross-attention map as Break-A-Scene's loss on SD reads; exp(s_j - logsumexp s)
      over those few keys, only the handles' columns kept.
    - "joint": the text columns of the joint softmax over all text (padding included)
      and image keys, the model's own probabilities (what Add-it and
      attention-map-diffusers read); from the fused kernel (joint_columns), never the
      pixels x (text + pixels) matrix.
    - "output": ConceptAttention's output-space map: each image token's attention
      output dotted with the prompt tokens' outputs (heads concatenated, before the
      output projections), softmax over the prompt's tokens; one map for all heads."""

    def __init__(self, store: AttentionStore, name: str):
        self.store = store
        self.name = name

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        import torch.nn.functional as F
        from diffusers.models.embeddings import apply_rotary_emb

        query = attn.to_q(hidden_states).unflatten(-1, (-1, attn.head_dim))
        key = attn.to_k(hidden_states).unflatten(-1, (-1, attn.head_dim))
        value = attn.to_v(hidden_states).unflatten(-1, (-1, attn.head_dim))
        query, key = attn.norm_q(query), attn.norm_k(key)
        text = encoder_hidden_states.shape[1]
        text_query = attn.norm_added_q(attn.add_q_proj(encoder_hidden_states).unflatten(-1, (-1, attn.head_dim)))
        text_key = attn.norm_added_k(attn.add_k_proj(encoder_hidden_states).unflatten(-1, (-1, attn.head_dim)))
        text_value = attn.add_v_proj(encoder_hidden_states).unflatten(-1, (-1, attn.head_dim))
        query, key = torch.cat([text_query, query], dim=1), torch.cat([text_key, key], dim=1)
        value = torch.cat([text_value, value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        # (batch, sequence, heads, dim) -> (batch, heads, sequence, dim) for SDPA.
        out = F.scaled_dot_product_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                                             attn_mask=attention_mask)
        out = out.transpose(1, 2).flatten(2, 3).to(query.dtype)

        ex, length, form = self.store.example, self.store.text_length or text, self.store.form
        columns, bias = self.store.columns, self.store.key_bias
        with autocast_off(query.device.type):
            image_query = query[ex, text:].transpose(0, 1).float()  # heads, pixels, dim
            if form == "text":
                text_key = key[ex, :length].transpose(0, 1).float()  # heads, prompt tokens, dim
                scores = torch.matmul(image_query, text_key.transpose(-1, -2)) / attn.head_dim ** 0.5
                if bias is not None:
                    scores = scores + bias[:length]
                probs = scores.softmax(dim=-1) if columns is None else (
                    scores[..., columns] - scores.logsumexp(dim=-1, keepdim=True)).exp()
            elif form == "joint":
                probs = joint_columns(image_query, key[ex].transpose(0, 1).float(),
                                      list(range(length)) if columns is None else columns)
            elif form == "output":
                scores = torch.matmul(out[ex, text:].float(), out[ex, :length].float().transpose(0, 1))
                if bias is not None:
                    scores = scores + bias[:length]
                probs = scores.softmax(dim=-1)[None]  # one "head": pixels, prompt tokens
                probs = probs if columns is None else probs[..., columns]
            else:
                raise ValueError(f"unknown attention map form {form!r}: one of {', '.join(FORMS)}")
        self.store.record(self.name, probs)

        text_out, image_out = out.split_with_sizes([text, out.shape[1] - text], dim=1)
        image_out = attn.to_out[1](attn.to_out[0](image_out.contiguous()))
        return image_out, attn.to_add_out(text_out.contiguous())


PROCESSORS = {"cross": RecordingAttnProcessor, "joint": RecordingJointAttnProcessor}


@contextlib.contextmanager
def capture_cross_attention(model, store: AttentionStore, layers: list[str], kind: str = "cross"):
    """Record the `layers`' maps into `store` with the processor of the family's
    attention `kind` (families.Family.attention_kind); restore every processor after."""
    original = dict(model.attn_processors)
    recording = PROCESSORS[kind]
    swapped = {name: recording(store, name) if name in layers else proc for name, proc in original.items()}
    model.set_attn_processor(swapped)
    try:
        yield store
    finally:
        model.set_attn_processor(original)
