"""Tokenizers with character offsets, and batch encoding into padded tensors with offsets and segments.

Teachers and students tokenise the same text differently, so that kvlib's time alignment (character
offsets, ``kvlib.resample.span_alignment``) is exercised for real. Two kinds, both built with the
``tokenizers`` library and wrapped in ``transformers.PreTrainedTokenizerFast``:

- ``char``: one token per character seen in the training texts (a ``WordLevel`` model over a split
  into single characters); characters never seen become ``<unk>``;
- ``bpe``: a byte-level BPE (GPT-2 style ``ByteLevel`` pre-tokenizer, ``BpeTrainer``) with the 256
  byte symbols always in the vocabulary, so nothing is ever unknown.

Choices the caller must know:

- ids 0-3 are ``SPECIALS``: ``<pad>``, ``<bos>``, ``<eos>``, ``<unk>``. Encoding adds no special
  token by itself; ``encode_batch`` adds ``<bos>`` / ``<eos>``. Special-token strings inside a text
  are tokenised as ordinary text (``split_special_tokens``), so a text can never inject an ``<eos>``.
- No offset trimming (no ``ByteLevel`` post-processor): a leading-space token ``"Ġword"`` covers
  the space, and ``text[start:end]`` is the token's text. Offsets are in characters, not bytes.
- A character that byte-level BPE splits over several tokens (an unmerged "€" is three byte
  tokens) is reported by ``tokenizers`` as the whole character for every piece. ``encode_batch``
  gives the character to the first piece and empty spans to the others, so offsets always tile
  the text: each token starts where the token before it ends.
- ``decode(ids)`` gives back the text exactly (no clean-up of spaces) for text in the training
  alphabet (``char``) or any text (``bpe``). Training is deterministic.
- Nothing is truncated: ``encode_batch`` raises on a text longer than ``max_length``, and ``check_lengths``
  refuses, before training or generation, examples (named by id) longer than a model's
  ``max_position_embeddings``.
- Load saved tokenizers with ``load_tokenizer`` (``PreTrainedTokenizerFast.from_pretrained``), never
  ``AutoTokenizer``: next to a Qwen2 ``config.json`` it returns a ``Qwen2Tokenizer`` that garbles ids.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence
from transformers import PreTrainedTokenizerFast

SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")
KINDS = ("char", "bpe")
PADDING_SIDES = ("right", "left")
MIN_BPE_VOCAB = 256 + len(SPECIALS)  # every byte, plus the specials


def _char_tokenizer(texts: Iterable[str]) -> Tokenizer:
    alphabet = set()
    for text in texts:
        alphabet.update(text)
    vocab = {token: i for i, token in enumerate(SPECIALS + tuple(sorted(alphabet)))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # every character, \n too
    tok.decoder = decoders.Fuse()
    return tok


def _bpe_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return tok


def train_tokenizer(kind: str, texts: Iterable[str], vocab_size: int | None = None) -> PreTrainedTokenizerFast:
    """A ``char`` tokenizer over the characters of ``texts`` (``vocab_size`` None), or a byte-level
    ``bpe`` trained on ``texts`` to at most ``vocab_size`` tokens (at least 260: 256 bytes + specials)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if kind == "char":
        if vocab_size is not None:
            raise ValueError(
                f"a char tokenizer's vocabulary is the characters of its texts; pass vocab_size=None, got {vocab_size}"
            )
        tok = _char_tokenizer(texts)
    else:
        if vocab_size is None or vocab_size < MIN_BPE_VOCAB:
            raise ValueError(
                f"a bpe tokenizer needs vocab_size >= {MIN_BPE_VOCAB} (256 bytes + {len(SPECIALS)} specials), "
                f"got {vocab_size}"
            )
        tok = _bpe_tokenizer(texts, vocab_size)
    tok.add_special_tokens(list(SPECIALS))  # already ids 0-3: this marks them special
    pad, bos, eos, unk = SPECIALS
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=pad,
        bos_token=bos,
        eos_token=eos,
        unk_token=unk,
        clean_up_tokenization_spaces=False,
        split_special_tokens=True,
    )


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, directory: str | Path) -> None:
    """Write the tokenizer's files into ``directory`` (created if needed; other files there are kept).

    Each file is written into a temporary folder inside ``directory`` and moved into place with
    ``os.replace``, so a reader never sees a half-written file.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tokenizer-", dir=directory))
    try:
        tokenizer.save_pretrained(tmp)
        for f in tmp.iterdir():
            os.replace(f, directory / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_tokenizer(directory: str | Path) -> PreTrainedTokenizerFast:
    """The tokenizer saved in ``directory``, also when a model's ``config.json`` sits beside it.

    Also reads the fast tokenizer of a real local checkpoint (Qwen2, TinyLlama, ...); one without a
    ``bos`` or ``pad`` token (Qwen2 has neither) gets its ``eos`` token in that role, since
    ``encode_batch`` starts every text with ``bos`` and pads with ``pad``.
    """
    directory = Path(directory)
    if not directory.exists():
        raise ValueError(
            f"{directory} does not exist; point it at a folder holding a tokenizer.json (a local checkpoint or a "
            "tokenizer saved with save_tokenizer)"
        )
    if not (directory / "tokenizer.json").is_file():
        raise ValueError(f"{directory} holds no tokenizer (no tokenizer.json); save one there with save_tokenizer")
    tokenizer = PreTrainedTokenizerFast.from_pretrained(directory)
    if tokenizer.eos_token is not None:
        tokenizer.bos_token = tokenizer.bos_token or tokenizer.eos_token
        tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    return tokenizer


def check_lengths(
    tokenizer, texts: list[str], ids: list[str], max_positions: int, reserve: int = 0, add_eos: bool = True
) -> None:
    """Refuse texts that, encoded as ``encode_batch`` does (``<bos>`` + tokens (+ ``<eos>``)) and followed by
    ``reserve`` generated tokens, need more than ``max_positions`` positions; ``ids`` name the texts.

    Nothing is ever truncated: a model given more tokens than its ``max_position_embeddings`` fails
    (absolute positions) or runs outside the positions it was trained on (RoPE) without a word.
    """
    if len(ids) != len(texts):
        raise ValueError(f"got {len(ids)} ids for {len(texts)} texts; give one id per text")
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []  # a tokenizer fails on []
    lengths = [len(t) + 1 + add_eos for t in encoded]
    too_long = [(i, n) for i, n in zip(ids, lengths) if n + reserve > max_positions]
    if too_long:
        i, n = too_long[0]
        generated = f" + {reserve} tokens to generate" if reserve else ""
        lower = ", lower max_new_tokens" if reserve else ""
        raise ValueError(
            f"example {i} is {n} tokens long (with <bos>{'/<eos>' if add_eos else ''}){generated}, more than the "
            f"model's max_position_embeddings={max_positions} ({len(too_long)} of {len(texts)} examples too long); "
            f"nothing is truncated: shorten or drop these examples{lower}, or use a model with more positions"
        )


def _special_ids(tokenizer, add_eos: bool) -> tuple[int, int, int]:
    ids = {
        "pad_token": tokenizer.pad_token_id,
        "bos_token": tokenizer.bos_token_id,
        "eos_token": tokenizer.eos_token_id,
    }
    missing = [name for name, i in ids.items() if i is None and (name != "eos_token" or add_eos)]
    if missing:
        raise ValueError(
            f"the tokenizer has no {missing}; set them first, e.g. tokenizer.bos_token = tokenizer.eos_token"
        )
    return ids["pad_token"], ids["bos_token"], ids["eos_token"]


def _char_cuts(spans: list[dict[str, tuple[int, int]]], texts: list[str]) -> Tensor:
    """Character cut points (B, S + 1) ``[0, c1, ..., len(text)]`` of contiguous spans."""
    if len(spans) != len(texts):
        raise ValueError(f"got {len(spans)} spans dicts for {len(texts)} texts; give one per text")
    counts = sorted({len(s) for s in spans})
    if len(counts) != 1 or counts[0] == 0:
        raise ValueError(f"every spans dict must hold the same number (>= 1) of segments, got {counts}")
    se = torch.tensor([list(s.values()) for s in spans], dtype=torch.long)  # (B, S, 2)
    if se.dim() != 3 or se.shape[-1] != 2:
        raise ValueError(
            f"each span must be a (start, end) pair of characters, got {[list(s.values()) for s in spans]}"
        )
    start, end = se[..., 0], se[..., 1]  # (B, S)
    lengths = torch.tensor([len(t) for t in texts])
    bad = (start[:, 0] != 0) | (start[:, 1:] != end[:, :-1]).any(1) | (end < start).any(1) | (end[:, -1] != lengths)
    if bad.any():
        i = int(bad.nonzero()[0])
        raise ValueError(
            f"spans of examples {bad.nonzero().flatten().tolist()} are not contiguous from 0 to len(text): "
            f"example {i} has {spans[i]} for a text of {len(texts[i])} characters; each span must start where "
            "the one before it ends, the first at 0, the last ending at len(text)"
        )
    return torch.cat([start[:, :1], end], dim=1)  # (B, S + 1)


def encode_batch(
    tokenizer: PreTrainedTokenizerFast,
    texts: list[str],
    spans: list[dict[str, tuple[int, int]]] | None = None,
    max_length: int | None = None,
    add_eos: bool = True,
    padding_side: str = "right",
) -> dict[str, Tensor]:
    """Tokenise ``texts`` into padded tensors with character offsets (and segment bounds).

    Returns, all long:

    - ``input_ids`` (B, T): ``<bos>`` + tokens (+ ``<eos>`` if ``add_eos``), padded with ``<pad>``
      on ``padding_side`` ("left" for batched generation from prompts) to the longest example;
    - ``attention_mask`` (B, T): 1 on real tokens (``<bos>`` / ``<eos>`` included);
    - ``offsets`` (B, T, 2): character ``[start, end)`` of each token in its text, tiling it; ``<bos>``
      gets (0, 0), ``<eos>`` (len(text), len(text)), padding (0, 0);
    - ``segment_bounds`` (B, S + 1), only with ``spans``: token cut points ``[0, b1, ..., b_S]`` of the
      segments, in the order of each spans dict (e.g. prompt / reasoning / answer). A token belongs
      to the segment holding its first character; ``<bos>`` to the first segment, ``<eos>`` to the
      last; ``b_S`` is the number of real tokens. Bounds count from the first real token, with left
      padding too: there segment ``j`` is at positions ``T - b_S + [b_j, b_{j+1})``.

    ``spans[i]`` maps segment names to character ``(start, end)`` spans of ``texts[i]`` that are
    contiguous, start at 0 and end at ``len(texts[i])``. A text longer than ``max_length`` tokens
    (with ``<bos>`` / ``<eos>``) raises; nothing is truncated.
    """
    if padding_side not in PADDING_SIDES:
        raise ValueError(f"padding_side must be one of {PADDING_SIDES}, got {padding_side!r}")
    if not isinstance(texts, list) or len(texts) == 0:
        raise ValueError(f"texts must be a non-empty list of strings, got {texts!r}")
    pad_id, bos_id, eos_id = _special_ids(tokenizer, add_eos)
    cuts = None if spans is None else _char_cuts(spans, texts)  # (B, S + 1)
    enc = tokenizer(texts, return_offsets_mapping=True, add_special_tokens=False)
    lengths = [len(ids) + 1 + add_eos for ids in enc["input_ids"]]
    too_long = [] if max_length is None else [(i, n) for i, n in enumerate(lengths) if n > max_length]
    if too_long:
        i, n = too_long[0]
        raise ValueError(
            f"example {i} is {n} tokens long (with <bos>/<eos>) but max_length is {max_length} "
            f"({len(too_long)} examples too long in all); raise max_length or shorten the texts"
        )
    ids, offs = [], []
    for text, tok_ids, tok_offs in zip(texts, enc["input_ids"], enc["offset_mapping"]):
        ids.append(torch.tensor([bos_id, *tok_ids] + [eos_id] * add_eos, dtype=torch.long))
        n = len(text)
        offs.append(torch.tensor([(0, 0), *tok_offs] + [(n, n)] * add_eos, dtype=torch.long))  # (T_i, 2)
    input_ids = pad_sequence(ids, batch_first=True, padding_value=pad_id, padding_side=padding_side)  # (B, T)
    offsets = pad_sequence(offs, batch_first=True, padding_value=0, padding_side=padding_side)  # (B, T, 2)
    B, T = input_ids.shape
    n_real = torch.tensor(lengths)  # (B,)
    first = T - n_real if padding_side == "left" else torch.zeros_like(n_real)  # (B,) position of <bos>
    pos = torch.arange(T)
    mask = (pos >= first[:, None]) & (pos < (first + n_real)[:, None])  # (B, T)

    # Tile: ends never decrease, and each token starts where the one before it ends. This hands a
    # character split over byte pieces to its first piece and gives the other pieces empty spans.
    end = offsets[..., 1].cummax(dim=1).values  # (B, T)
    start = torch.cat([torch.zeros(B, 1, dtype=torch.long), end[:, :-1]], dim=1)  # (B, T)
    offsets = (torch.stack([start, end], dim=-1) * mask[..., None]).long()  # (B, T, 2)

    out = {"input_ids": input_ids, "attention_mask": mask.long(), "offsets": offsets}
    if cuts is not None:
        S = cuts.shape[1] - 1
        seg = torch.searchsorted(cuts[:, 1:].contiguous(), offsets[..., 0].contiguous(), right=True)  # (B, T)
        seg = seg.clamp(max=S - 1).masked_fill(pos == first[:, None], 0)  # <bos> opens the first segment
        if add_eos:
            seg = seg.masked_fill(pos == (first + n_real - 1)[:, None], S - 1)  # <eos> closes the last one
        counts = torch.zeros(B, S, dtype=torch.long).scatter_add_(1, seg, mask.long())  # (B, S)
        out["segment_bounds"] = torch.cat([torch.zeros(B, 1, dtype=torch.long), counts.cumsum(1)], dim=1)
    return out
