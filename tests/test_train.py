"""The distillation engine end to end on smoke sizes: store -> aligner -> Distiller -> train -> evaluate."""

import json

import pytest
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from kvlib.batches import collate_fn
from kvlib.config import ModelShape, TrainConfig
from kvlib.data import generate
from kvlib.distill import Distiller, KVConfig, LayerProjection, TeacherAligner, shuffle_time
from kvlib.evaluate import evaluate
from kvlib.evaluate import generate as greedy
from kvlib.fusion import make_fusion
from kvlib.hf import KVSpec, extract_kv, kv_spec
from kvlib.layers import layer_map
from kvlib.rope import unrotate_keys
from kvlib.teacher_kv import extract_store, online_batch
from kvlib.text import encode_batch, train_tokenizer
from kvlib.train import _clip_separately, _separate_grads, check_validation, train

FAST = dict(batch_size=4, lr=3e-3, warmup_steps=2, log_every=1, save_every=2, share_every=2)
# A stored value is the float32 one rounded to float16 (relative error <= float16's unit roundoff), and the
# reference is computed by another float32 forward (other batch and padding): float32's default tolerances.
FP16_STORE = dict(rtol=torch.finfo(torch.float16).eps / 2 + 1.3e-6, atol=1e-5)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    examples = generate(16, seed=0, max_operand=9)
    tok_t = train_tokenizer("char", [e.text for e in examples])
    tok_s = train_tokenizer("bpe", [e.text for e in examples], vocab_size=300)
    teacher = ModelShape("qwen2", 3, 4, 2, 16, 64).build(len(tok_t), seed=1)
    store = extract_store(teacher, tok_t, examples, tmp_path_factory.mktemp("store"), batch_size=5, progress=False)
    return examples, tok_t, tok_s, teacher, store


def test_an_online_batch_is_what_the_store_returns(setup):
    examples, tok_t, _, teacher, store = setup
    online, stored = online_batch(teacher, tok_t, examples[3:7]), store.batch([3, 4, 5, 6])
    assert online.keys() == stored.keys()
    for name in ("mask", "attention_mask", "offsets", "segment_bounds"):
        assert torch.equal(online[name], stored[name]), name
    for (k, v), (k2, v2) in zip(online["kv"], stored["kv"]):
        torch.testing.assert_close(k2, k, **FP16_STORE)
        torch.testing.assert_close(v2, v, **FP16_STORE)


def student(tok, seed=0):
    return ModelShape("llama", 2, 4, 1, 8, 32).build(len(tok), seed=seed)


def distiller(setup, seed=0, **kv):
    examples, _, tok_s, teacher, store = setup
    s = student(tok_s, seed)
    cfg = KVConfig(**kv)
    spec_t, spec_s = store.spec, kv_spec(s.config)
    aligner = TeacherAligner(spec_t, spec_s, layer_map(3, 2, cfg.layer_map), cfg.projector, cfg.time_align)
    return Distiller(s, [aligner], cfg), collate_fn(tok_s, examples, [store])


def test_store_holds_the_teachers_pre_rope_kv(setup):
    examples, tok_t, _, teacher, store = setup
    enc = encode_batch(tok_t, [e.text for e in examples[:3]])
    with torch.no_grad():
        kv = extract_kv(teacher.eval(), enc["input_ids"], enc["attention_mask"])
    batch = store.batch([0, 1, 2])
    assert store.meta["pre_rope"] and len(batch["kv"]) == 3
    k_pre = unrotate_keys(kv[2][0], torch.arange(enc["input_ids"].shape[1]), teacher.config)
    n = int(enc["attention_mask"][1].sum())
    torch.testing.assert_close(batch["kv"][2][0][1, :, :n], k_pre[1, :, :n], **FP16_STORE)
    torch.testing.assert_close(batch["kv"][2][1][1, :, :n], kv[2][1][1, :, :n], **FP16_STORE)
    assert batch["mask"][1, :, :n].all() and not batch["mask"][1, :, n:].any()


@pytest.mark.parametrize("compression", ["kava_layer_mean", "crop"])
def test_compressed_store_keeps_the_budget_among_prompt_and_reasoning(setup, tmp_path, compression):
    examples, tok_t, _, teacher, _ = setup
    store = extract_store(teacher, tok_t, examples[:6], tmp_path, budget=7, compression=compression, progress=False)
    batch = store.batch(range(6))
    assert (batch["mask"].sum(-1) == 7).all()  # (B, H): 7 slots kept per head
    answer_start = batch["segment_bounds"][:, -2]
    kept_at = torch.arange(batch["mask"].shape[-1])[None, None].expand_as(batch["mask"])[batch["mask"]]
    assert (kept_at.view(6, -1) < answer_start[:, None]).all()
    assert store.meta["compression"] == compression and store.meta["budget"] == 7


def test_ce_only_distiller_matches_the_models_own_loss(setup):
    examples, _, tok_s, _, _ = setup
    s = student(tok_s)
    batch = collate_fn(tok_s, examples)(range(4))
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    expected = s(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels).loss
    terms = Distiller(s)(batch)
    torch.testing.assert_close(terms["ce"], expected)
    assert set(terms) == {"ce", "loss", "kv_std"}
    assert terms["kv_std"].shape == (s.config.num_hidden_layers, 2) and (terms["kv_std"] > 0).all()


@pytest.mark.parametrize("time_align", ["global", "segment", "span"])
def test_aligned_targets_have_the_students_shape_and_cover_its_tokens(setup, time_align):
    d, collate = distiller(setup, time_align=time_align)
    batch = collate(range(4))
    targets, unprojected, covered = d.aligners[0](batch["teachers"][0], batch)
    B, Ts = batch["input_ids"].shape
    assert [tuple(k.shape) for k, _ in targets] == [(B, 1, Ts, 8)] * 2
    assert [tuple(v.shape) for _, v in unprojected] == [(B, 2, Ts, 16)] * 2
    assert torch.equal(covered, batch["attention_mask"].bool())


def test_kv_terms_reach_the_student_and_the_projectors(setup):
    d, collate = distiller(setup, relation_weight=0.5, relation_heads=2)
    terms = d(collate(range(4)))
    assert set(terms) == {"ce", "kv", "relation", "loss", "kv_std"}
    assert terms["kv_std"].shape[1] == 4 and not terms["kv_std"].requires_grad
    torch.testing.assert_close(terms["loss"], terms["ce"] + terms["kv"] + 0.5 * terms["relation"])
    terms["loss"].backward()
    assert d.student.model.layers[0].self_attn.k_proj.weight.grad.abs().sum() > 0
    assert d.aligners[0].projectors[1].mix_v.grad.abs().sum() > 0


def run(setup, out, kv=True, **overrides):
    if kv:
        d, collate = distiller(setup)
    else:
        examples, _, tok_s, _, _ = setup
        d, collate = Distiller(student(tok_s)), collate_fn(tok_s, setup[0])
    cfg = TrainConfig(**{**FAST, "steps": 5, **overrides})
    summary = train(d, collate, len(setup[0]), cfg, out, progress=False)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return d, summary, [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def test_same_seed_gives_identical_metrics_and_parameters(setup, tmp_path):
    a, _, rows_a = run(setup, tmp_path / "a")
    b, _, rows_b = run(setup, tmp_path / "b")
    assert rows_a == rows_b and len(rows_a) == 5
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert "grad_share" in rows_a[1] and sum(rows_a[1]["grad_share"].values()) == pytest.approx(1.0)


def test_resumed_run_ends_where_an_uninterrupted_one_does(setup, tmp_path):
    full, _, rows_full = run(setup, tmp_path / "full")
    d, collate = distiller(setup)
    cfg = TrainConfig(**{**FAST, "steps": 5})
    partial = train(d, collate, len(setup[0]), cfg, tmp_path / "cut", stop_at=3, progress=False)
    assert partial["steps"] == 3 and not partial["finished"]
    resumed, collate = distiller(setup, seed=7)  # fresh weights: everything must come from the checkpoint
    summary = train(resumed, collate, len(setup[0]), cfg, tmp_path / "cut", progress=False)
    assert summary["finished"]
    assert all(torch.equal(p, q) for p, q in zip(full.parameters(), resumed.parameters()))
    rows = [json.loads(line) for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in rows] == rows_full
    assert (tmp_path / "cut" / "model" / "config.json").exists()


def test_training_lowers_the_loss(setup, tmp_path):
    _, _, rows = run(setup, tmp_path, kv=False, steps=12, save_every=100, lr=1e-2)
    assert rows[-1]["ce"] < rows[0]["ce"]


def test_batched_greedy_decoding_matches_one_at_a_time(setup):
    examples, _, tok_s, _, _ = setup
    s = student(tok_s)
    prompts = [e.prompt for e in examples[:5]]
    assert greedy(s, tok_s, prompts, 12, batch_size=5) == [greedy(s, tok_s, [p], 12)[0] for p in prompts]


def test_evaluate_writes_one_record_per_example(setup, tmp_path):
    examples, _, tok_s, _, _ = setup
    metrics = evaluate(student(tok_s), tok_s, examples[:6], tmp_path / "pred.jsonl", max_new_tokens=8)
    records = [json.loads(line) for line in (tmp_path / "pred.jsonl").read_text().splitlines()]
    assert [r["id"] for r in records] == [e.id for e in examples[:6]]
    assert metrics["n"] == 6 and metrics["accuracy"] == sum(r["correct"] for r in records) / 6
    assert set(records[0]) == {"id", "task", "gold", "prediction", "correct", "generated"}


def test_collate_rejects_a_store_of_other_examples(setup):
    examples, _, tok_s, _, store = setup
    with pytest.raises(ValueError, match="KV store 0 holds 16 examples that are not these 15"):
        collate_fn(tok_s, examples[1:], [store])


def test_distiller_needs_aligner_and_kv_config_together(setup):
    with pytest.raises(ValueError, match="pass teacher aligners and a KVConfig"):
        Distiller(student(setup[2]), kv=KVConfig())


def test_distiller_rejects_an_aligner_for_another_student(setup):
    d, _ = distiller(setup)
    other = ModelShape("llama", 2, 4, 2, 8, 32).build(len(setup[2]), seed=0)
    with pytest.raises(ValueError, match="aligner 0 targets KVSpec"):
        Distiller(other, list(d.aligners), KVConfig())


def test_aligner_rejects_a_layer_map_of_other_depths(setup):
    store = setup[4]
    with pytest.raises(ValueError, match="layer map goes from 4 to 2 layers but the teacher has 3"):
        TeacherAligner(store.spec, kv_spec(student(setup[2]).config), layer_map(4, 2), "linear", "span")


def test_the_layer_projection_mixes_teacher_layers_by_the_map_then_projects_each_student_layer():
    """``LayerProjection.project`` (shared by ``TeacherAligner`` and ``kvlib.latent.SlotAligner``) against a
    loop over student and teacher layers. The same float32 sums in another order: float32's default tolerances."""
    lmap = layer_map(3, 2, "uniform")
    projection = LayerProjection(KVSpec(3, 2, 8), KVSpec(2, 1, 4), lmap, "linear")
    kv = [(torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)) for _ in range(3)]  # Lt x (B, Ht, T, Dt)
    targets, mixed = projection.project(kv)
    W = lmap.matrix()  # (Ls, Lt)
    for s, ((k, v), (ks, vs), proj) in enumerate(zip(targets, mixed, projection.projectors)):
        torch.testing.assert_close(ks, sum(W[s, t] * kv[t][0] for t in range(3)))
        torch.testing.assert_close(vs, sum(W[s, t] * kv[t][1] for t in range(3)))
        assert k.shape == v.shape == (2, 1, 5, 4)
        torch.testing.assert_close((k, v), proj(ks, vs))


def test_aligner_rejects_a_teacher_batch_of_other_depth(setup):
    d, collate = distiller(setup)
    batch = collate(range(4))
    batch["teachers"][0]["kv"] = batch["teachers"][0]["kv"][:2]
    with pytest.raises(ValueError, match="teacher batch has 2 layers but the aligner was built for 3"):
        d(batch)


def test_train_rejects_fewer_examples_than_a_batch(setup, tmp_path):
    d, collate = distiller(setup)
    with pytest.raises(ValueError, match="3 training examples are fewer than one batch of 4"):
        train(d, collate, 3, TrainConfig(**FAST), tmp_path)


def test_extract_store_rejects_unknown_compression(setup, tmp_path):
    examples, tok_t, _, teacher, _ = setup
    with pytest.raises(ValueError, match="compression must be one of"):
        extract_store(teacher, tok_t, examples, tmp_path, budget=4, compression="random")


def test_extract_store_rejects_empty_budget(setup, tmp_path):
    examples, tok_t, _, teacher, _ = setup
    with pytest.raises(ValueError, match="budget must be >= 1 slot per head"):
        extract_store(teacher, tok_t, examples, tmp_path, budget=0)


def two_teacher_distiller(setup, kind, **fusion_kwargs):
    examples, _, tok_s, _, store = setup
    s = student(tok_s)
    spec_s = kv_spec(s.config)
    aligners = [TeacherAligner(store.spec, spec_s, layer_map(3, 2), "linear", "span") for _ in range(2)]
    fusion = make_fusion(kind, 2, spec_s.num_layers, s.config.hidden_size, 2, **fusion_kwargs)
    return Distiller(s, aligners, KVConfig(), fusion), collate_fn(tok_s, examples, [store, store])


@pytest.mark.parametrize("kind", ["fixed", "similarity", "attention", "task", "router"])
def test_every_fusion_kind_trains_from_two_teachers(setup, kind):
    d, collate = two_teacher_distiller(setup, kind)
    terms = d(collate(range(4)))
    w = terms["fusion_weights"]
    assert w.shape == (2, 4, 2) and (w >= 0).all()
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 4))
    terms["loss"].backward()
    assert d.student.model.layers[1].self_attn.v_proj.weight.grad.abs().sum() > 0


def test_fusing_a_teacher_with_itself_gives_the_single_teacher_loss(setup):
    single, collate1 = distiller(setup)
    double, collate2 = two_teacher_distiller(setup, "fixed")
    double.aligners[1].load_state_dict(double.aligners[0].state_dict())
    single.aligners[0].load_state_dict(double.aligners[0].state_dict())
    torch.testing.assert_close(double(collate2(range(4)))["kv"], single(collate1(range(4)))["kv"])


def test_router_entropy_term_enters_the_loss(setup):
    d, collate = two_teacher_distiller(setup, "router", entropy_weight=0.5)
    terms = d(collate(range(4)))
    uniform = 0.5 * torch.log(torch.tensor(2.0)).item()  # a zero-initialised router weighs both teachers 1/2
    assert terms["entropy"].item() == pytest.approx(uniform, rel=4 * torch.finfo(torch.float32).eps)  # 4 roundings
    torch.testing.assert_close(terms["loss"], terms["ce"] + terms["kv"] + terms["entropy"])


def test_training_logs_fusion_weights_per_task_and_layer(setup, tmp_path):
    d, collate = two_teacher_distiller(setup, "task")
    train(d, collate, len(setup[0]), TrainConfig(**{**FAST, "steps": 2}), tmp_path, progress=False)
    row = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert set(row["fusion_weights"]) == {"chain", "compare"}
    assert torch.tensor(row["fusion_weights"]["chain"]).shape == (2, 2)


def test_shuffle_permutes_real_steps_of_each_example_and_keeps_padding():
    real = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]]).bool()
    k = torch.arange(5.0).expand(2, 3, 5)[..., None].expand(2, 3, 5, 2).contiguous()  # value = time index
    ((ks, vs),) = shuffle_time([(k, k + 10)], real[:, None].expand(2, 3, 5), real)[0]
    assert torch.equal(ks[..., 0].sort(-1).values[0, :, :4], k[0, :, :4, 0]) and (ks[0, :, 4] == 4).all()
    assert torch.equal(vs - 10, ks)  # keys and values move together
    assert (ks[:, 0] == ks[:, 1]).all()  # one order for all heads
    torch.manual_seed(1)
    orders = {
        tuple(shuffle_time([(k, k)], real[:, None].expand(2, 3, 5), real)[0][0][0][0, 0, :4, 0].tolist())
        for _ in range(5)
    }
    assert len(orders) > 1


def test_shuffled_control_changes_the_targets(setup):
    d, collate = distiller(setup, time_align="global")
    shuffled = TeacherAligner(d.aligners[0].spec_t, d.aligners[0].spec_s, layer_map(3, 2), "linear", "global", True)
    shuffled.load_state_dict(d.aligners[0].state_dict())
    batch = collate(range(4))
    targets, _, _ = shuffled(batch["teachers"][0], batch)
    reference, _, _ = d.aligners[0](batch["teachers"][0], batch)
    assert not torch.allclose(targets[0][0], reference[0][0])


def test_several_teachers_need_a_fusion(setup):
    d, _ = distiller(setup)
    with pytest.raises(ValueError, match="2 teachers need a fusion"):
        Distiller(d.student, [d.aligners[0], d.aligners[0]], KVConfig())


def test_fusion_must_match_the_teacher_count(setup):
    d, _ = distiller(setup)
    with pytest.raises(ValueError, match="the fusion was built for 3 teachers but 1 are given"):
        Distiller(d.student, list(d.aligners), KVConfig(), make_fusion("fixed", 3, 2, 32, 2))


def test_a_compressed_store_trains_on_the_positions_its_kept_slots_reach(setup, tmp_path):
    examples, tok_t, tok_s, teacher, _ = setup
    store = extract_store(teacher, tok_t, examples, tmp_path, budget=6, compression="crop", progress=False)
    s = student(tok_s)
    spec_s = kv_spec(s.config)
    aligner = TeacherAligner(store.spec, spec_s, layer_map(3, 2), "linear", "span")
    d = Distiller(s, [aligner], KVConfig())
    batch = collate_fn(tok_s, examples, [store])(range(4))
    targets, _, covered = aligner(batch["teachers"][0], batch)
    assert covered.any() and (covered.sum(1) < batch["attention_mask"].sum(1)).all()
    assert covered.sum(1).max() <= 6 * 3  # a few student tokens around each kept teacher slot
    terms = d(batch)
    assert torch.isfinite(terms["kv"]) and terms["kv"] > 0


def test_validation_runs_every_eval_every_steps_and_at_the_end(setup, tmp_path):
    d, collate = distiller(setup)
    calls = []

    def validate():
        calls.append(d.student.training)
        return {"accuracy": 0.25}

    cfg = TrainConfig(**{**FAST, "steps": 5, "log_every": 10, "eval_every": 2})
    train(d, collate, len(setup[0]), cfg, tmp_path, progress=False, validate=validate)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "val_accuracy" in r] == [2, 4, 5] and calls == [True, True, True]
    assert d.student.training  # back in train mode after each validation


def test_accuracy_counts_exact_answers(setup):
    from kvlib.evaluate import accuracy

    examples, _, tok_s, _, _ = setup
    assert accuracy(student(tok_s), tok_s, examples[:4], max_new_tokens=4) == 0.0
    with pytest.raises(ValueError, match="accuracy needs at least one example"):
        accuracy(student(tok_s), tok_s, [], max_new_tokens=4)


def test_validation_under_fsdp_is_refused_with_the_fix():
    check_validation(DistributedType.MULTI_GPU, True)
    check_validation(DistributedType.FSDP, False)
    with pytest.raises(ValueError, match="not supported under FSDP; set eval_every: 0"):
        check_validation(DistributedType.FSDP, True)


def clipped(grads, params, max_norm):
    """Reference: one term's gradient (None as zeros) clipped to max_norm as torch's clip_grad_norm_ does."""
    grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
    norm = torch.sqrt(sum(g.square().sum() for g in grads))
    return [g * min(1.0, max_norm / (float(norm) + 1e-6)) for g in grads], float(norm)


@pytest.mark.parametrize("weight", [5.0, 500.0])
def test_separate_clipping_gives_the_ce_step_whatever_the_kv_weight(setup, weight):
    """The applied gradient is clip(grad CE, c) + clip(grad of the weighted rest, weight c): the CE part does not
    shrink when the KV term grows (under joint clipping it would, by the factor the KV norm sets), and the KV
    part is weight x clip(grad KV, c), so the weight keeps its meaning. The same float32 sums in another
    order: float32's default tolerances."""
    d, collate = distiller(setup, weight=weight)
    params = [p for p in d.parameters() if p.requires_grad]
    terms = d(collate(range(4)))
    ce_ref, ce_norm = clipped(
        torch.autograd.grad(terms["ce"], params, retain_graph=True, allow_unused=True), params, 0.1
    )
    aux = torch.autograd.grad(terms["loss"] - terms["ce"], params, retain_graph=True, allow_unused=True)
    aux_ref, aux_norm = clipped(aux, params, 0.1 * weight)
    assert ce_norm > 0.1 and aux_norm > 0.1 * weight  # both parts are clipped, so the test sees the scaling
    ce_sum = _separate_grads(Accelerator(cpu=True), terms, d.term_weights(), params, None, grad_accum=1)
    norms = _clip_separately(Accelerator(cpu=True), params, ce_sum, 0.1, 0.1 * weight)
    assert norms == pytest.approx((ce_norm, aux_norm), rel=1e-5)
    for p, c, a in zip(params, ce_ref, aux_ref):
        torch.testing.assert_close(p.grad, c + a)
    ce_part = torch.cat([(p.grad - a).flatten() for p, a in zip(params, aux_ref)])
    assert float(ce_part.norm()) == pytest.approx(0.1, rel=1e-4)  # the CE step has max_norm, not less
    kv_part = torch.cat([a.flatten() for a in aux_ref])
    assert float(kv_part.norm()) == pytest.approx(0.1 * weight, rel=1e-4)  # weight x max_norm: not all alike


def test_training_logs_kv_scales_and_pre_clip_norms(setup, tmp_path):
    d, collate = distiller(setup)
    cfg = TrainConfig(**{**FAST, "steps": 2, "clip": "separate"})
    train(d, collate, len(setup[0]), cfg, tmp_path / "kv", progress=False)
    row = json.loads((tmp_path / "kv" / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"grad_norm_ce", "grad_norm_aux", "clipped_ce", "clipped_aux"} <= set(row)
    assert set(row["kv_std"]) == {"student_k", "student_v", "target_k", "target_v"}
    assert all(len(v) == 2 and min(v) > 0 for v in row["kv_std"].values())  # one per student layer
    ce_only = Distiller(student(setup[2]))
    train(ce_only, collate, len(setup[0]), cfg, tmp_path / "ce", progress=False)
    row = json.loads((tmp_path / "ce" / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"grad_norm_ce", "clipped_ce"} <= set(row) and "grad_norm_aux" not in row
    assert set(row["kv_std"]) == {"student_k", "student_v"}


def test_separate_clipping_with_a_zero_kv_weight_steps_as_the_ce_only_run(setup, tmp_path):
    """A KV weight of 0 leaves no non-CE term: only CE is back-propagated, the logged non-CE norm is 0, and the
    student ends exactly where the CE-only run (no teacher) does. Exactly, by construction: both take the CE
    gradient of the same student on the same batches through the same graph (the KV branch is not on CE's
    path), and with max_grad_norm above every norm both clip factors are exactly 1 (the separate and the
    joint clipping sum the norm in other orders, so a clipped step would agree only to rounding)."""
    cfg = dict(clip="separate", max_grad_norm=1e6)
    zero, collate = distiller(setup, weight=0.0)
    train(zero, collate, len(setup[0]), TrainConfig(**{**FAST, "steps": 5, **cfg}), tmp_path / "zero", progress=False)
    rows = [json.loads(line) for line in (tmp_path / "zero" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["grad_norm_aux"] == 0 and r["clipped_aux"] == 0 and r["clipped_ce"] == 0 for r in rows)
    ce_only, _, rows_ce = run(setup, tmp_path / "ce", kv=False, **cfg)
    assert [r["ce"] for r in rows] == [r["ce"] for r in rows_ce]
    assert all(torch.equal(p, q) for p, q in zip(zero.student.parameters(), ce_only.student.parameters()))


def test_separate_clipping_refuses_fp16():
    with pytest.raises(ValueError, match="clip 'separate' takes the CE gradient apart"):
        TrainConfig(clip="separate", mixed_precision="fp16")
