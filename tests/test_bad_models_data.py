"""Incomplete or foreign checkpoints, foreign tokenizers, bad data files and over-long inputs are refused
with the problem and the fix named, never turned into a random model, a wrong number or a silent truncation."""

import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import BartConfig, BertConfig, BertForMaskedLM, BertLMHeadModel, LlamaModel, T5Config

from kvlib.batches import collate_fn
from kvlib.checkpoints import build, load_trained, tokenizer_corpus
from kvlib.config import ModelConfig
from kvlib.data import generate, load_gsm8k, load_jsonl, parse_answer
from kvlib.evaluate import accuracy, evaluate, evaluate_student
from kvlib.models import build_model, check_vocabulary, load_model, model_config
from kvlib.teacher_kv import extract_store
from kvlib.text import check_lengths, load_tokenizer, save_tokenizer, train_tokenizer

SHAPE = {"num_layers": 2, "num_heads": 2, "num_kv_heads": 2, "head_dim": 8, "hidden_size": 16}
BERT = {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32, "vocab_size": 20}


def llama(vocab_size: int = 20, **overrides):
    return build_model(model_config("llama", vocab_size=vocab_size, **SHAPE, **overrides), seed=0)


def rewrite_weights(directory, edit) -> None:
    """Apply ``edit`` to the checkpoint's tensors {name: tensor} and write them back."""
    tensors = load_file(directory / "model.safetensors")
    save_file(edit(tensors), directory / "model.safetensors", metadata={"format": "pt"})


# Checkpoints.


def test_a_checkpoint_missing_one_layers_tensors_is_refused(tmp_path):
    llama().save_pretrained(tmp_path)
    rewrite_weights(tmp_path, lambda t: {k: v for k, v in t.items() if ".layers.1." not in k})
    with pytest.raises(
        ValueError, match=r"lacks tensors of its LlamaForCausalLM \(9, e.g. \['model.layers.1.*at random"
    ):
        load_model(tmp_path)


def test_a_checkpoint_with_a_tensor_its_architecture_lacks_is_refused(tmp_path):
    llama().save_pretrained(tmp_path)
    rewrite_weights(tmp_path, lambda t: t | {"model.extra.weight": torch.zeros(3)})
    with pytest.raises(
        ValueError, match=r"holds tensors that its LlamaForCausalLM does not have \(1, e.g. \['model.extra"
    ):
        load_model(tmp_path)


def test_a_config_whose_vocab_size_differs_from_the_weights_is_refused(tmp_path):
    llama(vocab_size=20).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config | {"vocab_size": 30}))
    with pytest.raises(ValueError, match=r"model.embed_tokens.weight is \(20, 16\) in the weights but \(30, 16\) by"):
        load_model(tmp_path)


@pytest.mark.parametrize("family", ["gemma", "gpt2", "qwen2"])
def test_a_tied_model_saved_by_save_pretrained_loads_clean(tmp_path, family):
    config = model_config(family, vocab_size=20, **SHAPE)
    config.tie_word_embeddings = True  # gemma and gpt2 tie by default, kvlib's qwen2 does not
    model = build_model(config, seed=0)
    model.save_pretrained(tmp_path)
    assert "lm_head.weight" not in load_file(tmp_path / "model.safetensors")  # tied: absent from the file
    ids = torch.randint(0, 20, (1, 5))
    torch.testing.assert_close(load_model(tmp_path)(ids).logits, model.eval()(ids).logits)  # eval: no dropout


def test_a_path_that_does_not_exist_is_named_as_such(tmp_path):
    with pytest.raises(ValueError, match=r"checkpoint path .*nowhere does not exist; point path at a local"):
        load_model(tmp_path / "nowhere")


@pytest.mark.parametrize(
    "config, message",
    [
        (
            T5Config(d_model=16, num_layers=1, num_heads=2, d_kv=8, d_ff=32),
            r"'t5' config, which has no causal-LM class",
        ),
        (BartConfig(d_model=16, encoder_layers=1, decoder_layers=1), r"'bart' config of an encoder-decoder model"),
    ],
)
def test_a_config_of_no_decoder_only_causal_lm_is_refused_before_loading(tmp_path, config, message):
    config.save_pretrained(tmp_path)  # no weights: refused from the config alone
    with pytest.raises(ValueError, match=message + ".*kvlib distils decoder-only causal LMs"):
        load_model(tmp_path)


@pytest.mark.parametrize(
    "model, saved_as",
    [
        (lambda: BertForMaskedLM(BertConfig(**BERT)), "BertForMaskedLM"),
        (lambda: LlamaModel(llama().config), "LlamaModel"),
    ],
)
def test_a_checkpoint_saved_as_no_causal_lm_class_is_refused_by_name(tmp_path, model, saved_as):
    model().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=rf"saved as \['{saved_as}'\], which is no causal-LM class"):
        load_model(tmp_path)


def test_a_bert_saved_as_lm_head_model_without_is_decoder_is_refused_as_not_causal(tmp_path):
    BertLMHeadModel(BertConfig(**BERT)).save_pretrained(tmp_path)  # architectures: BertLMHeadModel, a causal-LM class
    with pytest.raises(ValueError, match=r"'bert' model whose attention \(\['BertSelfAttention'\]\) is not causal"):
        load_model(tmp_path)


# Tokenizers paired with models.


@pytest.fixture
def foreign(tmp_path):
    """A 20-row llama checkpoint next to a 30-token tokenizer of another model."""
    tokenizer = train_tokenizer("char", ["abcdefghijklmnopqrstuvwxyz"])
    assert len(tokenizer) == 30
    llama(vocab_size=20).save_pretrained(tmp_path / "ckpt")
    return tmp_path, tokenizer


def test_a_tokenizer_bigger_than_the_embedding_is_refused_by_check_vocabulary():
    tokenizer = train_tokenizer("char", ["abcdefghijklmnopqrstuvwxyz"])  # 26 letters + 4 specials
    with pytest.raises(ValueError, match=r"tokenizer has 30 tokens but the model's embedding has only 29 rows"):
        check_vocabulary(llama(vocab_size=29), tokenizer)
    check_vocabulary(llama(vocab_size=31), tokenizer)  # fewer tokens than rows: padded embeddings are fine


def test_a_checkpoint_with_another_models_tokenizer_is_refused_by_build(foreign):
    root, tokenizer = foreign
    save_tokenizer(tokenizer, root / "ckpt")
    with pytest.raises(ValueError, match=r"30 tokens .* only 20 rows: the tokenizer belongs to another model"):
        build(ModelConfig.from_params({"path": str(root / "ckpt")}), [], seed=0)


def test_the_tokenizer_corpus_is_the_named_split_else_the_models_own_and_a_missing_one_is_named():
    splits = {"teacher_train": generate(2, seed=0), "student_train": generate(3, seed=1)}
    own = {"family": "llama", **SHAPE}

    def model(corpus: str) -> ModelConfig:
        return ModelConfig.from_params({"shape": own, "tokenizer": {"corpus": corpus}, "train": {}})

    texts = {name: [e.text for e in split] for name, split in splits.items()}
    assert tokenizer_corpus(model(""), splits, "student_train") == texts["student_train"]
    assert tokenizer_corpus(model("teacher_train"), splits, "student_train") == texts["teacher_train"]
    with pytest.raises(ValueError, match=r"corpus 'teacher_train' is not one of the data splits \['student_train'\]"):
        tokenizer_corpus(model("teacher_train"), {"student_train": splits["student_train"]}, "student_train")


@pytest.mark.parametrize("layout", ["model-and-tokenizer", "checkpoint.json"])
def test_a_trained_folder_with_another_models_tokenizer_is_refused_by_load_trained(foreign, layout):
    root, tokenizer = foreign
    out = root / "teacher"
    out.mkdir()
    if layout == "checkpoint.json":  # a checkpoint used as it is, with a foreign tokenizer.json beside it
        save_tokenizer(tokenizer, root / "ckpt")
        (out / "checkpoint.json").write_text(json.dumps({"path": str(root / "ckpt")}))
    else:  # a trained model/ with a foreign tokenizer/
        (root / "ckpt").rename(out / "model")
        save_tokenizer(tokenizer, out / "tokenizer")
    with pytest.raises(ValueError, match=r"30 tokens .* only 20 rows: .*use the checkpoint's own tokenizer"):
        load_trained(out)


def test_a_tokenizer_folder_that_does_not_exist_is_named_as_such(tmp_path):
    with pytest.raises(ValueError, match=r"nowhere does not exist; point it at a folder holding a tokenizer.json"):
        load_tokenizer(tmp_path / "nowhere")


def test_a_checkpoint_json_naming_a_missing_path_says_it_does_not_exist(tmp_path):
    (tmp_path / "checkpoint.json").write_text(json.dumps({"path": str(tmp_path / "gone")}))
    with pytest.raises(ValueError, match=r"checkpoint path .*gone does not exist"):
        load_trained(tmp_path)


def test_evaluating_a_student_that_was_never_trained_names_the_missing_model(tmp_path):
    student = tmp_path / "students" / "G3-0"
    student.mkdir(parents=True)
    with pytest.raises(ValueError, match=r"G3-0 was not trained: no .*G3-0/model .*; run its train stage"):
        evaluate_student(student, tmp_path / "data", 8, student / "test_predictions.jsonl")


# Data files.


@pytest.mark.parametrize("content", ["", "\n  \n"])
def test_an_empty_gsm8k_file_is_refused_not_read_as_an_empty_test_split(tmp_path, content):
    path = tmp_path / "gsm8k.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError, match=r"gsm8k.jsonl holds no GSM8K example .*point data.files at a GSM8K JSONL"):
        load_gsm8k(path)


@pytest.mark.parametrize("final", ["1,00", "1,0000", "1234,567", "12,34,567"])
def test_a_gsm8k_answer_with_misgrouped_thousands_is_refused_naming_file_and_line(tmp_path, final):
    path = tmp_path / "gsm8k.jsonl"
    lines = [{"question": "q1", "answer": "a\n#### 5"}, {"question": "q2", "answer": f"b\n#### {final}"}]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    with pytest.raises(ValueError, match=rf"gsm8k.jsonl:2: the final answer '{final}' .* groups exactly three digits"):
        load_gsm8k(path)


@pytest.mark.parametrize("final, answer", [("1,000", "1000"), ("12,345,678", "12345678"), ("-1,234", "-1234")])
def test_a_gsm8k_answer_with_correct_thousands_separators_is_read_as_its_integer(tmp_path, final, answer):
    path = tmp_path / "gsm8k.jsonl"
    path.write_text(json.dumps({"question": "q", "answer": f"a\n#### {final}"}) + "\n")
    assert load_gsm8k(path)[0].answer == answer


@pytest.mark.parametrize(
    "generated, answer",
    [("#### 1,00", None), ("#### 1,0000 apples", None), ("#### 12,34", None), ("#### 1,000 apples", "1000")],
)
def test_parse_answer_reads_commas_only_as_thousands_separators(generated, answer):
    assert parse_answer(generated) == answer


GSM8K_LINE = {"question": "Ann has 5 apples. How many?", "answer": "She has 5.\n#### 5"}
EXAMPLE_LINE = vars(generate(1, seed=0, max_operand=9)[0])


@pytest.mark.parametrize("loader, line", [(load_jsonl, EXAMPLE_LINE), (load_gsm8k, GSM8K_LINE)])
def test_a_latin1_byte_in_a_jsonl_file_is_refused_naming_file_and_line(tmp_path, loader, line):
    path = tmp_path / "test.jsonl"
    good = json.dumps(line).encode() + b"\n"
    path.write_bytes(good + good.replace(b'"question": "', b'"question": "Caf\xe9 ', 1))  # a Latin-1 e-acute
    with pytest.raises(ValueError, match=r"test.jsonl:2: not UTF-8 \(byte 0xe9 .*re-encode the file as UTF-8"):
        loader(path)


# Over-long inputs.


@pytest.mark.parametrize("metric", [accuracy, evaluate])
def test_evaluation_refuses_a_prompt_longer_than_the_models_positions(tmp_path, metric):
    examples = generate(3, seed=0, max_operand=9)  # prompts of 141, 165 and 135 characters
    examples[1] = replace(examples[1], question=examples[1].question * 2)
    tokenizer = train_tokenizer("char", [e.text for e in examples])
    model = llama(vocab_size=len(tokenizer), max_positions=200)
    n = len(examples[1].prompt) + 1  # one token per character, and <bos>
    kwargs = {"out_path": tmp_path / "p.jsonl"} if metric is evaluate else {}
    with pytest.raises(
        ValueError,
        match=rf"example {examples[1].id} is {n} tokens long \(with <bos>\) \+ 4 tokens to generate, more than the "
        r"model's max_position_embeddings=200 \(1 of 3 examples too long\); nothing is truncated: .*lower max_new",
    ):
        metric(model, tokenizer, examples, max_new_tokens=4, **kwargs)


def test_check_lengths_refuses_a_training_text_longer_than_the_models_positions():
    tokenizer = train_tokenizer("char", ["abc"])
    with pytest.raises(
        ValueError,
        match=r"example b is 6 tokens long \(with <bos>/<eos>\), more than the model's max_position_embeddings=5 "
        r"\(1 of 2 examples too long\); nothing is truncated: shorten or drop these examples, or use a model",
    ):
        check_lengths(tokenizer, ["abc", "abca"], ["a", "b"], max_positions=5)
    check_lengths(tokenizer, ["abc", "abca"], ["a", "b"], max_positions=6)  # exactly fits


def test_check_lengths_needs_one_id_per_text():
    with pytest.raises(ValueError, match=r"got 1 ids for 2 texts; give one id per text"):
        check_lengths(train_tokenizer("char", ["abc"]), ["abc", "abca"], ["a"], max_positions=8)


def test_collate_fn_refuses_a_training_example_longer_than_the_students_positions_before_any_batch():
    examples = generate(3, seed=0, max_operand=9)
    tokenizer = train_tokenizer("char", [e.text for e in examples])
    longest = max(len(e.text) for e in examples) + 2  # one token per character, <bos> and <eos>
    collate_fn(tokenizer, examples, max_length=longest)  # exactly fits
    with pytest.raises(ValueError, match=r"tokens long \(with <bos>/<eos>\), more than the model's max_position_em"):
        collate_fn(tokenizer, examples, max_length=longest - 1)


def test_teacher_kv_extraction_refuses_an_example_longer_than_the_teachers_positions(tmp_path):
    examples = generate(2, seed=0, max_operand=9)
    tokenizer = train_tokenizer("char", [e.text for e in examples])
    model = llama(vocab_size=len(tokenizer), max_positions=64)
    with pytest.raises(ValueError, match=r"more than the model's max_position_embeddings=64 \(2 of 2 examples"):
        extract_store(model, tokenizer, examples, tmp_path / "kv", progress=False)
    assert not (tmp_path / "kv").exists()


def test_a_smoke_default_that_was_never_built_says_how_to_build_it(tmp_path):
    with pytest.raises(ValueError, match=r"was not trained.*smoke defaults read build/smoke/: build it first with"):
        load_trained(tmp_path / "build" / "smoke" / "artifacts" / "students" / "G0-0")


def test_a_model_without_its_tokenizer_says_its_stage_was_interrupted(tmp_path):
    (tmp_path / "G0-0" / "model").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"holds a model but no tokenizer/tokenizer.json: .* run that stage again"):
        load_trained(tmp_path / "G0-0")
