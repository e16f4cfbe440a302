"""The handle tokens in a model: adding them to the tokenizer and text encoder,
initialising their rows, training only those rows, and finding them in token ids."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import InvalidInput
from ..kept import one_builder_at_a_time

# A token that names an embedding row no token of the base vocabulary reaches (its
# spaces keep it from ever being a handle's name).
SPARE_ROW = "<spare row {}>"


@one_builder_at_a_time
def first_word_token(tokenizer, word: str) -> int:
    """The id of `word`'s first sub-token that carries some of the word: T5's
    SentencePiece starts a word it has no piece for with a bare "▁" (the word boundary,
    the same row for every such word) and may give <unk> for a character it lacks."""
    ids = tokenizer(word, add_special_tokens=False).input_ids
    for token_id, piece in zip(ids, tokenizer.convert_ids_to_tokens(ids)):
        if token_id != tokenizer.unk_token_id and piece.strip("\u2581 "):
            return token_id
    raise InvalidInput(f"--init-words: {word!r} gives no token this model knows: choose another word")


def check_handles(tokenizer, tokens: list[str], init_words: list[str] | None = None) -> None:
    """The handles are new to the tokenizer, and each init word gives a token it knows
    (InvalidInput otherwise): all `learn` needs the base's tokenizer for, checked
    before its models load (a bad word was found after the class images were made)."""
    vocab = tokenizer.get_vocab()
    for token in tokens:
        if token in vocab:
            raise InvalidInput(f"handle {token} is already a token of this model's vocabulary: choose another --names")
    for word in init_words or ():
        first_word_token(tokenizer, word)


@one_builder_at_a_time  # (it makes parameters: see kept.py)
def add_handles(tokenizer, text_encoder, tokens: list[str], init_words: list[str] | None = None) -> list[int]:
    """Add the handle tokens, set their initial embeddings and return their ids.

    Without init words, handle i starts from row V - 2N + i of the base vocabulary,
    as the paper's code does: rare byte-pair merges near the end of CLIP's vocabulary.
    """
    check_handles(tokenizer, tokens, init_words)
    base_rows = len(tokenizer)
    embedding = text_encoder.get_input_embeddings().weight.detach()
    if init_words:
        init_ids = [first_word_token(tokenizer, word) for word in init_words]
    else:
        init_ids = [base_rows - 2 * len(tokens) + i for i in range(len(tokens))]
    initial = embedding[init_ids].clone()
    # T5's table has rows no token reaches (32128 for 32100 tokens): name them first, so
    # that the handles get fresh rows after the existing ones instead of shrinking it.
    spare = embedding.shape[0] - base_rows
    if spare > 0:
        tokenizer.add_tokens([SPARE_ROW.format(base_rows + i) for i in range(spare)], special_tokens=True)
    tokenizer.add_tokens(tokens)
    ids = tokenizer.convert_tokens_to_ids(tokens)
    text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)  # rows are set just below
    with torch.no_grad():
        text_encoder.get_input_embeddings().weight[ids] = initial
    return ids


class HandleEmbedding(nn.Module):
    """Token embedding whose base rows are a frozen buffer and whose handle rows are
    one small trainable parameter, so AdamW's weight decay (and any optimizer) can
    never touch ordinary words."""

    def __init__(self, base_weight: torch.Tensor, handle_weight: torch.Tensor):
        super().__init__()
        self.register_buffer("base", base_weight.detach().clone(), persistent=False)
        self.handles = nn.Parameter(handle_weight.detach().clone().float())
        self.num_base = base_weight.shape[0]

    @property
    def weight(self) -> torch.Tensor:
        return torch.cat([self.base, self.handles.to(self.base.dtype)])

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # No `if any handle` branch: asking a GPU tensor that makes the CPU wait every step.
        is_handle = input_ids >= self.num_base
        out = nn.functional.embedding(input_ids.clamp(max=self.num_base - 1), self.base)
        handle_rows = nn.functional.embedding((input_ids - self.num_base).clamp(min=0), self.handles)
        return torch.where(is_handle.unsqueeze(-1), handle_rows.to(out.dtype), out)


@one_builder_at_a_time  # (it makes parameters: see kept.py)
def install_handle_embedding(text_encoder, num_handles: int) -> HandleEmbedding:
    """Swap the text encoder's token embedding for a HandleEmbedding (training)."""
    weight = text_encoder.get_input_embeddings().weight.detach()
    module = HandleEmbedding(weight[:-num_handles], weight[-num_handles:])
    text_encoder.set_input_embeddings(module)
    return module


@one_builder_at_a_time
def remove_handle_embedding(text_encoder) -> torch.Tensor:
    """Put an ordinary nn.Embedding back, with the learned handle rows; returns them."""
    module = text_encoder.get_input_embeddings()
    if not isinstance(module, HandleEmbedding):
        raise TypeError("the text encoder has no HandleEmbedding installed")
    weight = module.weight.detach()
    embedding = nn.Embedding(weight.shape[0], weight.shape[1], device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        embedding.weight.copy_(weight)
    embedding.weight.requires_grad_(False)
    text_encoder.set_input_embeddings(embedding)
    return module.handles.detach().clone()


def handle_positions(input_ids, handle_ids: list[int]) -> list[int]:
    """Position of each handle's (first) occurrence in one tokenized prompt (a list of
    ids, or a 1-D tensor)."""
    positions = []
    row = input_ids.tolist() if isinstance(input_ids, torch.Tensor) else list(input_ids)
    for hid in handle_ids:
        positions.append(row.index(hid))
    return positions
