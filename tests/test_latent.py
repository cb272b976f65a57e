"""The latent student: the thought loop, its Jacobi form, gradients, the answer CE and the pass count."""

import pytest
import torch

from kvlib.config import ModelShape
from kvlib.data import generate
from kvlib.hf import kv_spec
from kvlib.latent import (
    LatentDistiller,
    LatentStudent,
    SlotAligner,
    codi_loss,
    cot_slots,
    latent_batch,
    load_latent,
    thought_kv_loss,
)
from kvlib.layers import layer_map
from kvlib.text import train_tokenizer

EXAMPLES = generate(6, seed=0, max_operand=9)
TOKENIZER = train_tokenizer("char", [e.text for e in EXAMPLES])
FAMILIES = ["llama", "qwen2", "mistral", "gemma", "gpt2"]


def student(family="llama", M=3, passes=0, seed=0):
    model = ModelShape(family, 2, 4, 2 if family != "gpt2" else 4, 8, 32).build(len(TOKENIZER), seed=seed)
    torch.manual_seed(seed)
    return LatentStudent(model, M, passes).eval()


def batch(n=3):
    return latent_batch(TOKENIZER, EXAMPLES[:n])


@pytest.mark.parametrize("family", FAMILIES)
def test_each_thought_is_the_projection_of_the_hidden_state_before_it(family):
    """The embeddings fed at the thought positions are exactly project(last hidden state of the step before):
    caught at the model's first decoder input, compared bit for bit."""
    s = student(family)
    fed = []
    handle = s.student.register_forward_pre_hook(lambda m, args, kw: fed.append(kw["inputs_embeds"]), with_kwargs=True)
    b = batch()
    t = s.think(b["prompt_ids"], b["prompt_mask"])
    handle.remove()
    assert len(fed) == 1 + s.num_thoughts  # the prompt with the begin marker, then one pass per thought
    for i in range(s.num_thoughts):
        assert torch.equal(fed[1 + i][:, 0], t.inputs[:, i])
        assert torch.equal(t.inputs[:, i], s.project(t.hidden[:, i]))
    assert torch.equal(fed[0][:, -1], s.bot.expand(3, -1))


def test_jacobi_passes_reach_the_sequential_thoughts_after_m_passes():
    """Pass p fixes thoughts 1..p, so M passes give the sequential thoughts up to float32 reordering (the same
    products summed over up to T keys in another order: ~T eps per layer, relative 1e-4 leaves headroom); M - 1
    passes leave the last thought unconverged, far outside that tolerance."""
    b, M = batch(), 4
    sequential = student(M=M).think(b["prompt_ids"], b["prompt_mask"])
    jacobi = student(M=M, passes=M).think(b["prompt_ids"], b["prompt_mask"])
    torch.testing.assert_close(jacobi.inputs, sequential.inputs, rtol=1e-4, atol=1e-5)
    early = student(M=M, passes=M - 1).think(b["prompt_ids"], b["prompt_mask"])
    torch.testing.assert_close(early.inputs[:, : M - 1], sequential.inputs[:, : M - 1], rtol=1e-4, atol=1e-5)
    assert (early.inputs[:, -1] - sequential.inputs[:, -1]).abs().max() > 1e-2
    assert (sequential.passes, jacobi.passes) == (M + 1, M + 1)


@pytest.mark.parametrize("passes", [0, 2])
def test_the_answer_ce_reaches_the_projection_and_the_markers(passes):
    s = student(passes=passes).train()
    terms = s(batch())
    terms["loss"].backward()
    for name, p in [("bot", s.bot), ("eot", s.eot), *s.project.named_parameters()]:
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    L, (B, M) = s.student.config.num_hidden_layers, (3, s.num_thoughts)
    assert len(terms["kv"]) == L and terms["kv"][0][0].shape == (B, 2, M, 8)
    assert len(terms["hidden"]) == L + 1 and terms["hidden"][-1].shape == (B, 32)


def test_the_answer_ce_is_the_teacher_forced_cross_entropy_of_the_answer_tokens():
    """Reference: the same sequence fed as one forward pass of embeddings (prompt, begin marker, the thoughts,
    end marker, answer), the CE of each answer token from the position before it."""
    s = student()
    b = batch(1)
    t = s.think(b["prompt_ids"], b["prompt_mask"])
    emb = s.student.get_input_embeddings()
    seq = torch.cat(
        [emb(b["prompt_ids"]), s.bot[None, None], t.inputs, s.eot[None, None], emb(b["answer_ids"])], 1
    )  # (1, T, h)
    logits = s.student(inputs_embeds=seq).logits[0]  # (T, V)
    Ta = b["answer_ids"].shape[1]
    expected = torch.nn.functional.cross_entropy(logits[-Ta - 1 : -1], b["answer_ids"][0])
    torch.testing.assert_close(s(b)["ce"], expected, rtol=1e-4, atol=1e-5)


def test_generation_counts_the_forward_passes_of_each_answer():
    s = student(M=3)
    b = batch(2)
    tokens, passes = s.generate(b["prompt_ids"], b["prompt_mask"], max_new_tokens=5, eos_id=TOKENIZER.eos_token_id)
    assert tokens.shape[0] == 2 and tokens.shape[1] <= 5
    eos = TOKENIZER.eos_token_id
    for row, n in zip(tokens.tolist(), passes.tolist()):
        generated = row.index(eos) + 1 if eos in row else len(row)
        assert n == 1 + 3 + 1 + (generated - 1)  # prompt, 3 thoughts, end marker, each further token


def test_left_padding_is_required_and_bad_settings_are_refused():
    b = batch()
    s = student()
    with pytest.raises(ValueError, match="prompts must be left-padded"):
        s.think(b["prompt_ids"], b["prompt_mask"].flip(1))
    with pytest.raises(ValueError, match="num_thoughts=0 must be >= 1"):
        LatentStudent(s.student, 0)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_an_example_thinks_the_same_alone_and_left_padded_in_a_batch(family):
    """Padding is masked and positions count real tokens only, so a short prompt padded on the left gets the
    thoughts it gets alone (float32: the masked keys drop out of the softmax; the same tolerance as above)."""
    s = student(family)
    b = batch(3)
    lengths = b["prompt_mask"].sum(1)
    assert lengths.min() < lengths.max()  # the batch really pads someone
    together = s.think(b["prompt_ids"], b["prompt_mask"]).inputs
    for i in range(3):
        alone = latent_batch(TOKENIZER, EXAMPLES[i : i + 1])
        single = s.think(alone["prompt_ids"], alone["prompt_mask"]).inputs
        torch.testing.assert_close(together[i : i + 1], single, rtol=1e-4, atol=1e-5)


# the teacher side and the losses


def test_cot_slots_are_reasoning_tokens_in_time_order_with_pre_rope_keys():
    from kvlib.hf import extract_kv
    from kvlib.rope import unrotate_keys

    s, b, M = student(), batch(3), 4
    model = s.student
    for rule in ("rkv", "crop"):
        out = cot_slots(model, b, M, rule)
        assert len(out["kv"]) == 2 and out["kv"][0][0].shape == (3, 2, M, 8) and not out["kv"][0][0].requires_grad
        assert out["kept"].all()  # every chain here is longer than M tokens
    kv = extract_kv(model, b["input_ids"], b["attention_mask"])
    T = b["input_ids"].shape[1]
    pre = unrotate_keys(kv[1][0], torch.arange(T), model.config)  # (B, H, T, D)
    crop = cot_slots(model, b, M, "crop")
    end = b["segment_bounds"][:, 2]  # (B,) first answer token
    for i in range(3):  # crop keeps the last M reasoning tokens, in order
        torch.testing.assert_close(crop["kv"][1][0][i], pre[i, :, end[i] - M : end[i]])
    rkv = cot_slots(model, b, M, "rkv")["kv"][1][0]  # (B, H, M, D): each slot is some reasoning token's key
    for i in range(3):
        start = int(b["segment_bounds"][i, 1])
        d = (rkv[i][:, :, None] - pre[i][:, None, start : end[i]]).abs().amax(-1)  # (H, M, reasoning)
        found = d.argmin(-1)  # (H, M) the reasoning token each slot holds
        assert (d.amin(-1) < 1e-5).all() and (found.diff(dim=-1) > 0).all()  # exactly a key; in time order


def test_self_distillation_takes_its_slots_from_the_teacher_mode_pass_it_trains():
    """One teacher-mode pass (eager attention, with gradients) gives the CE, CODI's state and the same slots as a
    separate no-gradient pass; under eager attention both passes compute the same thing in the same order."""
    from kvlib.latent import select_cot_slots, teacher_mode

    s, b, M = student(), batch(3), 4
    model = s.student.train()
    one = teacher_mode(model, b, cache=True)
    plain = teacher_mode(model, b)
    torch.testing.assert_close(one["ce"], plain["ce"])  # eager vs the default attention: float32's own rounding
    assert one["ce"].requires_grad
    for rule in ("rkv", "crop"):
        got = select_cot_slots(one["kv"], one["attn"], b["segment_bounds"], M, model.config, rule)
        want = cot_slots(model, b, M, rule)
        assert torch.equal(got["positions"], want["positions"]) and torch.equal(got["kept"], want["kept"])
        for (k, v), (kw, vw) in zip(got["kv"], want["kv"]):
            assert torch.equal(k, kw) and torch.equal(v, vw) and not k.requires_grad


@pytest.mark.parametrize("family", FAMILIES)
def test_both_modes_continuing_one_prompt_pass_compute_what_reading_it_twice_does(family):
    """The student and teacher modes of a training step continue one pass over the prompts: a causal model's
    prompt states do not depend on what follows, so the answer CE, the thoughts' KV, the teacher CE, CODI's states
    and the self-distillation slots are those of reading the whole text. Both compute the same sums grouped
    otherwise (keys from a cache, other padding), so float32's rounding is the tolerance; the slots are the same
    tokens. A prompt that is not the text's prefix falls back to reading the whole text."""
    from kvlib.latent import select_cot_slots, teacher_mode

    s, b, M = student(family), batch(3), 4  # eval mode: no dropout (GPT-2), gradients still flow
    model = s.student
    prompt = s.read_prompt(b["prompt_ids"], b["prompt_mask"])
    alone, shared_s = s(b), s(b, prompt)
    torch.testing.assert_close(shared_s["ce"], alone["ce"])
    for (k, v), (kw, vw) in zip(shared_s["kv"], alone["kv"]):
        torch.testing.assert_close(k, kw)
        torch.testing.assert_close(v, vw)
    whole = teacher_mode(model, b, cache=True)
    shared = teacher_mode(model, b, cache=True, prompt=prompt)
    assert torch.equal(shared["start"], b["segment_bounds"][:, 1])  # the prompt was shared, not read again
    torch.testing.assert_close(shared["ce"], whole["ce"])
    direct = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], output_hidden_states=True)
    last = b["segment_bounds"][:, 2] - 1  # CODI's position: the last reasoning token
    for h, w, d in zip(shared["hidden"], whole["hidden"], direct.hidden_states):
        torch.testing.assert_close(h, w)
        torch.testing.assert_close(h, d[torch.arange(3), last])
    for rule in ("rkv", "crop"):
        got = select_cot_slots(
            shared["kv"], shared["attn"], shared["bounds"], M, model.config, rule, start=shared["start"]
        )
        want = select_cot_slots(whole["kv"], whole["attn"], whole["bounds"], M, model.config, rule)
        assert torch.equal(got["positions"], want["positions"]) and torch.equal(got["kept"], want["kept"])
        for (k, v), (kw, vw) in zip(got["kv"], want["kv"]):
            torch.testing.assert_close(k, kw)
            torch.testing.assert_close(v, vw)
    shared["ce"].backward()
    assert s.student.get_input_embeddings().weight.grad.abs().sum() > 0
    other = dict(b, prompt_ids=b["prompt_ids"].roll(1, 0))  # another example's prompt: not this text's prefix
    fallback = teacher_mode(model, other, prompt=s.read_prompt(other["prompt_ids"], other["prompt_mask"]))
    torch.testing.assert_close(fallback["ce"], teacher_mode(model, b)["ce"])


def test_codi_loss_closed_form():
    t = [torch.tensor([[0.0, 2.0], [2.0, 0.0]])]  # std (ddof 1) over the 4 values: sqrt(4/3)
    s = [torch.tensor([[1.0, 2.0], [2.0, 1.0]])]  # |s - t| = 1, 0, 0, 1: mean 0.5
    assert codi_loss(s, t).item() == pytest.approx(0.5 / (4 / 3) ** 0.5)
    grad_t = t[0].clone().requires_grad_(True)
    codi_loss([s[0].clone().requires_grad_(True)], [grad_t]).backward()
    assert grad_t.grad is None  # the teacher side is a target


def test_thought_kv_loss_is_zero_on_its_own_targets_and_scale_free():
    s, b = student(), batch(2)
    out = s(b)
    from kvlib.rope import unrotate_keys

    pre = [(unrotate_keys(k, out["kv_positions"], s.student.config), v) for k, v in out["kv"]]
    kept = torch.ones(len(pre), 2, 2, s.num_thoughts, dtype=torch.bool)
    assert thought_kv_loss(out, {"kv": pre, "kept": kept}, s.student.config).item() == pytest.approx(0, abs=1e-5)
    scaled = {"kv": [(3 * k, 0.1 * v) for k, v in pre], "kept": kept}
    assert thought_kv_loss(out, scaled, s.student.config).item() == pytest.approx(0, abs=1e-5)


def test_self_distillation_trains_every_term_with_the_loop(tmp_path):
    import json

    from kvlib.config import TrainConfig
    from kvlib.train import train

    latent = LatentStudent(ModelShape("llama", 2, 4, 2, 8, 32).build(len(TOKENIZER), seed=0), 3)
    distiller = LatentDistiller(latent, {"teacher_ce": 1.0, "codi": 1.0, "kv": 1.0})
    cfg = TrainConfig(steps=2, batch_size=3, warmup_steps=1, log_every=1, save_every=2, share_every=1)
    train(distiller, lambda idx: latent_batch(TOKENIZER, [EXAMPLES[i] for i in idx]), 6, cfg, tmp_path, progress=False)
    row = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"ce", "teacher_ce", "codi", "kv", "loss"} <= set(row)
    assert load_latent(tmp_path / "model").num_thoughts == 3
    assert set(row["grad_share"]) == {"ce", "teacher_ce", "codi", "kv"} and min(row["grad_share"].values()) > 0


def test_a_saved_latent_student_loads_back_and_thinks_the_same(tmp_path):
    s, b = student(M=2), batch(2)
    s.save_pretrained(tmp_path / "model")
    back = load_latent(tmp_path / "model").eval()
    assert (back.num_thoughts, back.passes) == (2, 0)
    assert torch.equal(
        back.think(b["prompt_ids"], b["prompt_mask"]).inputs, s.think(b["prompt_ids"], b["prompt_mask"]).inputs
    )
    with pytest.raises(ValueError, match="holds no latent.json"):
        load_latent(tmp_path)


# teachers of other families


TEACHER_TOKENIZER = train_tokenizer("bpe", [e.text for e in EXAMPLES], vocab_size=300)


def qwen_teacher(seed=1):
    return ModelShape("qwen2", 3, 4, 2, 16, 64).build(len(TEACHER_TOKENIZER), seed=seed).eval()


def teacher_text(n=3):
    """The first n examples as the teacher reads them: its own tokenizer, right-padded, with segment bounds."""
    from kvlib.text import encode_batch

    return encode_batch(TEACHER_TOKENIZER, [e.text for e in EXAMPLES[:n]], [e.spans for e in EXAMPLES[:n]])


def table_of(teacher, M=3):
    from kvlib.slot_table import SlotTable

    return SlotTable.compute(teacher, TEACHER_TOKENIZER, EXAMPLES, M, batch_size=4)


def indexed_batch(n=3):
    return latent_batch(TOKENIZER, EXAMPLES[:n], list(range(n)))


def aligner_for(teacher, latent, seed=0):
    torch.manual_seed(seed)
    spec_t, spec_s = kv_spec(teacher.config), kv_spec(latent.student.config)
    return SlotAligner(spec_t, spec_s, layer_map(spec_t.num_layers, spec_s.num_layers))


def test_shared_slots_hold_one_teacher_token_in_every_layer_and_head():
    out = cot_slots(qwen_teacher(), teacher_text(), 4, "rkv", shared=True)
    assert (out["positions"] == out["positions"][:1, :, :1]).all()  # the same tokens for all layers and heads
    assert (out["positions"].diff(dim=-1) > 0).all()  # in time order
    own = cot_slots(qwen_teacher(), teacher_text(), 4, "rkv")["positions"]
    assert not (own == own[:1, :, :1]).all()  # per layer and head the rule picks differently: sharing is a choice


def test_a_slot_aligner_of_matching_shapes_starts_as_the_identity():
    teacher = qwen_teacher()
    spec = kv_spec(teacher.config)
    slots = cot_slots(teacher, teacher_text(), 4, shared=True)
    targets, kept = SlotAligner(spec, spec, layer_map(spec.num_layers, spec.num_layers))(slots)
    for (k, v), (kt, vt) in zip(targets, slots["kv"]):
        torch.testing.assert_close(k, kt)  # an identity head mix and head-dim map: float32's own rounding
        torch.testing.assert_close(v, vt)
    assert kept.shape == (3, 4) and kept.all()


def test_a_slot_table_row_is_the_teachers_slots_of_that_example():
    """Rows looked up by index are cot_slots of those examples read as one batch: the table was computed in other
    batches (4 at a time, other padding), and right padding changes no real token's state up to float32's
    rounding of sums over more (masked) keys."""
    teacher = qwen_teacher()
    table = table_of(teacher, M=4)
    assert len(table) == len(EXAMPLES)
    rows = table(torch.tensor([2, 0, 5]))
    want = cot_slots(teacher, teacher_text(6), 4, shared=True)
    pick = torch.tensor([2, 0, 5])
    for (k, v), (kw, vw) in zip(rows["kv"], want["kv"]):
        torch.testing.assert_close(k, kw[pick])
        torch.testing.assert_close(v, vw[pick])
    assert torch.equal(rows["kept"], want["kept"][:, pick])
    with pytest.raises(ValueError, match=r"rows are 0\.\.5"):
        table(torch.tensor([6]))


def test_a_slot_table_is_saved_once_and_recomputed_when_its_inputs_change(tmp_path, monkeypatch):
    from kvlib.slot_table import SlotTable

    teacher, path = qwen_teacher(), tmp_path / "A.safetensors"
    first = SlotTable.build(path, teacher, TEACHER_TOKENIZER, EXAMPLES, 3)
    calls = []
    compute = SlotTable.compute.__func__
    monkeypatch.setattr(
        SlotTable, "compute", classmethod(lambda cls, *a, **k: calls.append(a) or compute(cls, *a, **k))
    )
    again = SlotTable.build(path, teacher, TEACHER_TOKENIZER, EXAMPLES, 3)
    assert calls == [] and all(torch.equal(again.tensors[n], x) for n, x in first.tensors.items())
    SlotTable.build(path, teacher, TEACHER_TOKENIZER, EXAMPLES, 2)  # another budget
    SlotTable.build(path, qwen_teacher(seed=2), TEACHER_TOKENIZER, EXAMPLES, 2)  # another teacher
    SlotTable.build(path, qwen_teacher(seed=2), TEACHER_TOKENIZER, EXAMPLES[:5], 2)  # other examples
    assert len(calls) == 3
    path.write_bytes(path.read_bytes()[:-100])  # a torn file reads as no table
    assert len(SlotTable.build(path, qwen_teacher(seed=2), TEACHER_TOKENIZER, EXAMPLES[:5], 2)) == 5
    assert len(calls) == 4


def test_a_teacher_of_another_family_supervises_the_thoughts_through_its_aligner():
    latent = student(M=3).train()
    teacher = qwen_teacher()
    d = LatentDistiller(latent, {"kv": 1.0}, teachers=[table_of(teacher)], aligners=[aligner_for(teacher, latent)])
    terms = d(indexed_batch())
    terms["loss"].backward()
    assert terms["kv"] > 0
    proj = d.aligners[0].projectors[0]
    assert proj.mix_k.grad.abs().sum() > 0 and latent.project.net[0].weight.grad.abs().sum() > 0
    assert not any(n.startswith("teachers") for n, _ in d.named_parameters())
    with pytest.raises(ValueError, match="needs its examples' 'index'"):
        d(batch())


def test_two_copies_of_one_teacher_fused_give_the_single_teacher_loss():
    from kvlib.fusion import make_fusion

    teacher = qwen_teacher()
    table = table_of(teacher)
    single = LatentDistiller(student(M=3), {"kv": 1.0}, teachers=[table], aligners=[aligner_for(teacher, student())])
    fusion = make_fusion("fixed", 2, 2, 32, 2, [0.5, 0.5])
    aligners = [aligner_for(teacher, student()), aligner_for(teacher, student())]
    double = LatentDistiller(student(M=3), {"kv": 1.0}, teachers=[table, table], aligners=aligners, fusion=fusion)
    torch.testing.assert_close(double(indexed_batch())["kv"], single(indexed_batch())["kv"])
    with pytest.raises(ValueError, match="a fusion exactly when there are several teachers"):
        LatentDistiller(student(), {"kv": 1.0}, teachers=[table, table], aligners=aligners)


def test_evaluation_scores_answers_and_averages_the_forward_passes():
    from kvlib.latent import evaluate_latent

    s = student(M=2)
    records, summary = evaluate_latent(s, TOKENIZER, EXAMPLES[:4], max_new_tokens=6, batch_size=3)
    assert [r["id"] for r in records] == [e.id for e in EXAMPLES[:4]] and summary["n"] == 4
    assert summary["forward_passes"] == pytest.approx(sum(r["forward_passes"] for r in records) / 4)
    assert all(1 + 2 + 1 <= r["forward_passes"] <= 1 + 2 + 1 + 5 for r in records)
    assert summary["accuracy"] == sum(r["correct"] for r in records) / 4
