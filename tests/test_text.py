import copy

import pytest
import torch

from kvlib.models import build_model, model_config
from kvlib.text import SPECIALS, encode_batch, load_tokenizer, save_tokenizer, train_tokenizer

CORPUS = [
    f"Natalia sold {n} clips in April, café {n % 7}€ each.\n"
    f"In May — half: <<{n}/2={n // 2}>> {n // 2} clips.\n\n#### {n + n // 2}"
    for n in range(2, 80, 2)
] + ["It 's a test , with spaces . And  tabs\tand — dashes!? (yes) [no] {x} 'q' \"d\" ~ ^ % & * + - _ | ; @"]

TEXTS = [
    "Natalia sold 48 clips in April, café 5€ each.\nIn May she sold half: <<48/2=24>> 24 clips.\n\n#### 72",
    "  It 's a test , with spaces . And  tabs\tand — dashes!?  \n",  # clean-up of spaces would change it
    "<<7*8=56>>\n<<56-6=50>>\n#### 50",
    "",
]


@pytest.fixture(scope="module")
def tokenizers():
    return {"char": train_tokenizer("char", CORPUS), "bpe": train_tokenizer("bpe", CORPUS, vocab_size=400)}


def token_offsets(tokenizer, text):
    enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
    return enc["input_ids"], enc["offset_mapping"]


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_decode_restores_the_text(tokenizers, kind):
    tok = tokenizers[kind]
    for text in TEXTS:
        assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_offsets_give_each_tokens_text_and_tile_the_text(tokenizers, kind):
    tok = tokenizers[kind]
    for text in TEXTS:
        ids, offsets = token_offsets(tok, text)
        assert [tok.decode([i]) for i in ids] == [text[s:e] for s, e in offsets]
        ends = [0] + [e for _, e in offsets]
        assert [s for s, _ in offsets] == ends[:-1] and ends[-1] == len(text)


def test_bpe_leading_space_tokens_cover_the_space(tokenizers):
    tok = tokenizers["bpe"]
    text = "she sold 48 clips"
    ids, offsets = token_offsets(tok, text)
    pieces = [text[s:e] for s, e in offsets]
    assert " sold" in pieces and " 48" in pieces
    assert tok.convert_ids_to_tokens(ids[pieces.index(" sold")]) == "Ġsold"


def test_char_tokenizer_gives_one_token_per_character(tokenizers):
    tok = tokenizers["char"]
    text = TEXTS[0]
    ids, offsets = token_offsets(tok, text)
    assert offsets == [(i, i + 1) for i in range(len(text))]
    assert tok.convert_ids_to_tokens(ids) == list(text)
    assert len(tok) == len(SPECIALS) + len(set("".join(CORPUS)))


def test_char_tokenizer_maps_unseen_characters_to_unk(tokenizers):
    tok = tokenizers["char"]
    ids, offsets = token_offsets(tok, "a日b")
    assert ids[1] == tok.unk_token_id == SPECIALS.index("<unk>")
    assert offsets == [(0, 1), (1, 2), (2, 3)]


def test_specials_have_fixed_ids_and_encoding_adds_none(tokenizers):
    for tok in tokenizers.values():
        assert tok.convert_ids_to_tokens(list(range(4))) == list(SPECIALS)
        assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
        assert tok("ab")["input_ids"] == tok("ab", add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_special_token_strings_in_a_text_stay_plain_text(tokenizers, kind):
    tok = tokenizers[kind]
    text = "a <eos> b <pad>"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert not set(ids) & {0, 1, 2}
    assert tok.decode(ids) == text


def test_bpe_with_a_larger_vocab_merges_into_fewer_tokens_than_char(tokenizers):
    n_char = len(tokenizers["char"](TEXTS[0])["input_ids"])
    n_bpe = len(tokenizers["bpe"](TEXTS[0])["input_ids"])
    assert n_char == len(TEXTS[0])
    assert n_bpe < 0.5 * n_char
    assert len(tokenizers["bpe"]) == 400


def test_bpe_gives_a_character_split_into_byte_pieces_to_its_first_piece():
    tok = train_tokenizer("bpe", ["plain ascii text, 12 + 30 = 42"] * 5, vocab_size=270)
    text = "x 5€ 日"
    ids, raw = token_offsets(tok, text)
    assert raw.count((3, 4)) == 3  # tokenizers reports the whole "€" for each of its three bytes
    offsets = encode_batch(tok, [text])["offsets"][0, 1:-1].tolist()
    assert "".join(text[s:e] for s, e in offsets) == text
    assert [s for s, _ in offsets[1:]] == [e for _, e in offsets[:-1]]
    euro = [i for i, (s, e) in enumerate(raw) if (s, e) == (3, 4)]
    assert [offsets[i] for i in euro] == [[3, 4], [4, 4], [4, 4]]
    assert tok.decode([ids[i] for i in euro]) == "€"
    assert tok.decode(ids) == text


def test_training_is_deterministic(tokenizers):
    for kind, vocab_size in (("char", None), ("bpe", 400)):
        again = train_tokenizer(kind, CORPUS, vocab_size)
        assert again.get_vocab() == tokenizers[kind].get_vocab()
        assert again(TEXTS)["input_ids"] == tokenizers[kind](TEXTS)["input_ids"]


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_save_and_load_give_identical_ids(tokenizers, kind, tmp_path):
    tok = tokenizers[kind]
    save_tokenizer(tok, tmp_path / "tok")
    loaded = load_tokenizer(tmp_path / "tok")
    assert loaded(TEXTS)["input_ids"] == tok(TEXTS)["input_ids"]
    assert [loaded.decode(ids) for ids in loaded(TEXTS)["input_ids"]] == TEXTS
    assert (loaded.pad_token_id, loaded.bos_token_id, loaded.eos_token_id) == (0, 1, 2)
    assert sorted(p.name for p in (tmp_path / "tok").iterdir()) == ["tokenizer.json", "tokenizer_config.json"]


def test_tokenizer_saved_beside_a_qwen2_model_loads_unchanged(tokenizers, tmp_path):
    tok = tokenizers["bpe"]
    config = model_config(
        "qwen2", num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8, hidden_size=16, vocab_size=len(tok)
    )
    build_model(config, 0).save_pretrained(tmp_path)
    save_tokenizer(tok, tmp_path)
    assert (tmp_path / "config.json").is_file() and (tmp_path / "model.safetensors").is_file()
    loaded = load_tokenizer(tmp_path)
    assert loaded(TEXTS)["input_ids"] == tok(TEXTS)["input_ids"]
    assert encode_batch(loaded, TEXTS)["input_ids"].equal(encode_batch(tok, TEXTS)["input_ids"])


# encode_batch


def test_encode_batch_pads_on_the_right_with_bos_and_eos(tokenizers):
    tok = tokenizers["char"]
    a, b, c = (tok.convert_tokens_to_ids(ch) for ch in "abc")
    out = encode_batch(tok, ["ab", "abca", ""])
    assert set(out) == {"input_ids", "attention_mask", "offsets"}
    assert all(v.dtype == torch.long for v in out.values())
    assert out["input_ids"].tolist() == [[1, a, b, 2, 0, 0], [1, a, b, c, a, 2], [1, 2, 0, 0, 0, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 1, 0, 0], [1] * 6, [1, 1, 0, 0, 0, 0]]
    assert out["offsets"].tolist() == [
        [[0, 0], [0, 1], [1, 2], [2, 2], [0, 0], [0, 0]],
        [[0, 0], [0, 1], [1, 2], [2, 3], [3, 4], [4, 4]],
        [[0, 0], [0, 0], [0, 0], [0, 0], [0, 0], [0, 0]],
    ]


def test_encode_batch_without_eos_ends_on_the_last_token(tokenizers):
    tok = tokenizers["char"]
    out = encode_batch(tok, ["ab", "a"], add_eos=False)
    assert out["input_ids"].tolist() == [
        [1, *tok.convert_tokens_to_ids(["a", "b"])],
        [1, tok.convert_tokens_to_ids("a"), 0],
    ]
    assert out["offsets"][0].tolist() == [[0, 0], [0, 1], [1, 2]]


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_encode_batch_offsets_tile_each_text(tokenizers, kind):
    tok = tokenizers[kind]
    out = encode_batch(tok, TEXTS)
    for i, text in enumerate(TEXTS):
        real = out["attention_mask"][i].bool()
        ids, offsets = out["input_ids"][i, real], out["offsets"][i, real].tolist()
        assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
        assert offsets[0] == [0, 0] and offsets[-1] == [len(text), len(text)]
        assert [s for s, _ in offsets[1:]] == [e for _, e in offsets[:-1]]
        assert [text[s:e] for s, e in offsets[1:-1]] == [tok.decode([t]) for t in ids[1:-1].tolist()]
        assert (out["offsets"][i, ~real] == 0).all() and (out["input_ids"][i, ~real] == tok.pad_token_id).all()


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_left_padding_puts_the_same_tokens_last(tokenizers, kind):
    tok = tokenizers[kind]
    spans = [{"all": (0, len(t))} for t in TEXTS]
    right = encode_batch(tok, TEXTS, spans)
    left = encode_batch(tok, TEXTS, spans, padding_side="left")
    n = right["attention_mask"].sum(1)
    T = right["input_ids"].shape[1]
    for i in range(len(TEXTS)):
        assert left["attention_mask"][i].tolist() == [0] * (T - n[i]) + [1] * n[i]
        for key in ("input_ids", "offsets"):
            assert left[key][i, T - n[i] :].equal(right[key][i, : n[i]])
        assert (left["input_ids"][i, : T - n[i]] == tok.pad_token_id).all()
    assert left["segment_bounds"].equal(right["segment_bounds"])


def split_spans(text):
    """prompt / reasoning / answer: up to the first newline, up to "####", the rest."""
    p = text.index("\n") + 1
    r = text.index("####")
    return {"prompt": (0, p), "reasoning": (p, r), "answer": (r, len(text))}


@pytest.mark.parametrize("kind", ["char", "bpe"])
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_segment_bounds_agree_with_offsets_and_spans(tokenizers, kind, padding_side):
    tok = tokenizers[kind]
    texts = [TEXTS[0], TEXTS[2], CORPUS[3]]
    spans = [split_spans(t) for t in texts]
    out = encode_batch(tok, texts, spans, padding_side=padding_side)
    bounds, mask = out["segment_bounds"], out["attention_mask"]
    assert bounds.shape == (3, 4) and (bounds[:, 0] == 0).all() and (bounds.diff(dim=1) > 0).all()
    assert bounds[:, -1].equal(mask.sum(1))
    for i, s in enumerate(spans):
        offsets = out["offsets"][i, mask[i].bool()]  # (n, 2), from <bos>
        for j, (c0, c1) in enumerate(s.values()):
            starts = offsets[bounds[i, j] : bounds[i, j + 1], 0]
            if j == 0:
                starts = starts[1:]  # <bos>
            if j == 2:
                starts = starts[:-1]  # <eos>
            assert ((starts >= c0) & (starts < c1)).all()


def test_segment_bounds_golden_with_an_empty_segment(tokenizers):
    tok = tokenizers["char"]
    spans = [
        {"prompt": (0, 2), "reasoning": (2, 4), "answer": (4, 5)},
        {"prompt": (0, 3), "reasoning": (3, 3), "answer": (3, 5)},
    ]
    out = encode_batch(tok, ["Q?A=1", "abc12"], spans)
    assert out["segment_bounds"].tolist() == [[0, 3, 5, 7], [0, 4, 4, 7]]
    out = encode_batch(tok, ["Q?A=1", "abc12"], spans, add_eos=False)
    assert out["segment_bounds"].tolist() == [[0, 3, 5, 6], [0, 4, 4, 6]]


def test_bos_and_eos_join_the_first_and_last_segment_even_when_empty(tokenizers):
    tok = tokenizers["char"]
    spans = [{"prompt": (0, 0), "reasoning": (0, 2), "answer": (2, 2)}]
    assert encode_batch(tok, ["ab"], spans)["segment_bounds"].tolist() == [[0, 1, 3, 4]]


def test_a_leading_space_token_joins_the_segment_of_its_space(tokenizers):
    tok = tokenizers["bpe"]
    text = "she sold 48 clips"
    out = encode_batch(tok, [text], [{"prompt": (0, 9), "answer": (9, len(text))}])
    offsets = out["offsets"][0].tolist()
    b1 = out["segment_bounds"][0, 1]
    assert text[slice(*offsets[b1 - 1])] == " 48"  # the space is the prompt's last character


def test_text_of_exactly_max_length_tokens_is_kept(tokenizers):
    out = encode_batch(tokenizers["char"], ["abc", "a"], max_length=5)
    assert out["input_ids"].shape == (2, 5)


# errors


def test_train_rejects_unknown_kind():
    with pytest.raises(ValueError, match=r"kind must be one of \('char', 'bpe'\), got 'wordpiece'"):
        train_tokenizer("wordpiece", CORPUS)


def test_char_rejects_a_vocab_size():
    with pytest.raises(ValueError, match="pass vocab_size=None, got 100"):
        train_tokenizer("char", CORPUS, vocab_size=100)


@pytest.mark.parametrize("vocab_size", [None, 259])
def test_bpe_needs_a_vocab_size_covering_the_bytes(vocab_size):
    with pytest.raises(ValueError, match=f"bpe tokenizer needs vocab_size >= 260 .*got {vocab_size}"):
        train_tokenizer("bpe", CORPUS, vocab_size=vocab_size)


def test_load_rejects_a_folder_without_tokenizer(tmp_path):
    with pytest.raises(ValueError, match="holds no tokenizer .*save one there with save_tokenizer"):
        load_tokenizer(tmp_path)


def test_encode_rejects_a_text_longer_than_max_length(tokenizers):
    with pytest.raises(ValueError, match=r"example 1 is 7 tokens long \(with <bos>/<eos>\) but max_length is 5"):
        encode_batch(tokenizers["char"], ["abc", "abcab", "ab"], max_length=5)


@pytest.mark.parametrize(
    "spans",
    [
        {"prompt": (0, 2), "answer": (3, 5)},  # gap
        {"prompt": (0, 3), "answer": (2, 5)},  # overlap
        {"prompt": (1, 3), "answer": (3, 5)},  # not from 0
        {"prompt": (0, 3), "answer": (3, 4)},  # not to the end
        {"prompt": (0, 3), "reasoning": (3, 2), "answer": (2, 5)},  # backwards
    ],
)
def test_encode_rejects_spans_that_do_not_tile_the_text(tokenizers, spans):
    cuts = [0, *range(2, len(spans) + 1), 5]  # a valid tiling of "abcab" with as many segments
    valid = dict(zip(spans, zip(cuts[:-1], cuts[1:])))
    with pytest.raises(ValueError, match=r"spans of examples \[1\] are not contiguous from 0 to len\(text\)"):
        encode_batch(tokenizers["char"], ["abcab", "abcab"], [valid, spans])


def test_encode_rejects_one_spans_dict_too_few(tokenizers):
    with pytest.raises(ValueError, match="got 1 spans dicts for 2 texts; give one per text"):
        encode_batch(tokenizers["char"], ["ab", "ab"], [{"all": (0, 2)}])


def test_encode_rejects_different_segment_counts(tokenizers):
    spans = [{"all": (0, 2)}, {"prompt": (0, 1), "answer": (1, 2)}]
    with pytest.raises(ValueError, match=r"same number \(>= 1\) of segments, got \[1, 2\]"):
        encode_batch(tokenizers["char"], ["ab", "ab"], spans)


def test_encode_rejects_spans_that_are_not_pairs(tokenizers):
    with pytest.raises(ValueError, match=r"each span must be a \(start, end\) pair"):
        encode_batch(tokenizers["char"], ["ab"], [{"all": (0, 1, 2)}])


def test_encode_rejects_unknown_padding_side(tokenizers):
    with pytest.raises(ValueError, match=r"padding_side must be one of \('right', 'left'\), got 'middle'"):
        encode_batch(tokenizers["char"], ["ab"], padding_side="middle")


def test_encode_rejects_an_empty_batch(tokenizers):
    with pytest.raises(ValueError, match="texts must be a non-empty list of strings, got \\[\\]"):
        encode_batch(tokenizers["char"], [])


def test_encode_rejects_a_tokenizer_without_bos(tokenizers):
    tok = copy.deepcopy(tokenizers["char"])
    tok.bos_token = None
    with pytest.raises(ValueError, match=r"the tokenizer has no \['bos_token'\]; set them first"):
        encode_batch(tok, ["ab"])
