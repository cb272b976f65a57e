import pytest
import torch
from tiny import tiny

from kvlib.hf import extract_kv, kv_spec
from kvlib.projectors import KVProjector

# Real teacher -> student KV head pairs: Qwen2.5-1.5B -> 0.5B, Qwen2-7B, Llama-2-7B -> TinyLlama, and back, 7 -> 3, MQA.
HEAD_PAIRS = [(12, 2), (28, 4), (32, 8), (8, 32), (7, 3), (1, 4)]


@pytest.mark.parametrize("kind", ["linear", "elastic"])
@pytest.mark.parametrize("Ht, Hs", HEAD_PAIRS)
def test_projector_maps_teacher_shape_to_student_shape(kind, Ht, Hs):
    proj = KVProjector(Ht, Hs, Dt=16, Ds=8, kind=kind)
    k, v = proj(torch.randn(2, Ht, 5, 16), torch.randn(2, Ht, 5, 16))
    assert k.shape == v.shape == (2, Hs, 5, 8)
    torch.testing.assert_close(proj.mix_k.sum(1), torch.ones(Hs))


@pytest.mark.parametrize("Ht, Hs", [(12, 2), (28, 4), (32, 8)])
def test_divisible_heads_start_as_grouped_average(Ht, Hs):
    proj = KVProjector(Ht, Hs, Dt=8, Ds=8)
    k, v = torch.randn(2, Ht, 5, 8), torch.randn(2, Ht, 5, 8)
    pk, pv = proj(k, v)
    torch.testing.assert_close(pk, k.view(2, Hs, Ht // Hs, 5, 8).mean(2))
    torch.testing.assert_close(pv, v.view(2, Hs, Ht // Hs, 5, 8).mean(2))


def test_more_student_heads_start_as_copies():
    proj = KVProjector(1, 4, Dt=8, Ds=8)
    k = torch.randn(2, 1, 5, 8)
    pk, _ = proj(k, k)
    torch.testing.assert_close(pk, k.expand(2, 4, 5, 8))


def test_indivisible_heads_start_as_overlap_average():
    proj = KVProjector(7, 3, Dt=4, Ds=4)
    k = torch.randn(1, 7, 2, 4)
    pk, _ = proj(k, k)
    torch.testing.assert_close(pk[:, 1], (2 * k[:, 2] + 3 * k[:, 3] + 2 * k[:, 4]) / 7)


@pytest.mark.parametrize("kind", ["linear", "elastic"])
def test_projector_is_identity_when_shapes_match(kind):
    proj = KVProjector(4, 4, Dt=8, Ds=8, kind=kind)
    k, v = torch.randn(2, 4, 6, 8), torch.randn(2, 4, 6, 8)
    pk, pv = proj(k, v)
    torch.testing.assert_close(pk, k)
    torch.testing.assert_close(pv, v)


def test_dim_change_starts_norm_preserving():
    proj = KVProjector(2, 2, Dt=8, Ds=16)
    k = torch.randn(3, 2, 5, 8)
    pk, _ = proj(k, k)
    torch.testing.assert_close(pk.norm(dim=-1), k.norm(dim=-1))


@pytest.mark.parametrize("kind", ["linear", "elastic"])
def test_one_optimizer_step_changes_the_projector(kind):
    proj = KVProjector(7, 3, Dt=16, Ds=8, kind=kind)
    before = {n: p.detach().clone() for n, p in proj.named_parameters()}
    opt = torch.optim.SGD(proj.parameters(), lr=0.1)
    k, v = proj(torch.randn(2, 7, 5, 16), torch.randn(2, 7, 5, 16))
    (k - torch.randn_like(k)).square().mean().add((v - torch.randn_like(v)).square().mean()).backward()
    opt.step()
    changed = {n for n, p in proj.named_parameters() if not torch.equal(p, before[n])}
    assert {"mix_k", "mix_v", "dim_k.linear.weight", "dim_v.linear.weight"} <= changed
    if kind == "elastic":
        assert {"dim_k.bottleneck.3.weight", "dim_v.bottleneck.3.weight"} <= changed


def test_projects_real_teacher_cache_onto_student_spec():
    teacher, student = tiny("gemma"), tiny("qwen2")
    st, ss = kv_spec(teacher.config), kv_spec(student.config)
    proj = KVProjector(st.num_kv_heads, ss.num_kv_heads, st.head_dim, ss.head_dim)
    ids = torch.randint(0, 61, (2, 6))
    k, v = extract_kv(teacher, ids)[0]
    pk, pv = proj(k, v)
    ks, _ = extract_kv(student, ids)[0]
    assert pk.shape == pv.shape == ks.shape


def test_projector_rejects_wrong_teacher_shape():
    proj = KVProjector(4, 2, Dt=8, Ds=16)
    with pytest.raises(ValueError, match=r"expected teacher keys of shape \(B, 4, T, 8\), got \(2, 3, 5, 8\)"):
        proj(torch.randn(2, 3, 5, 8), torch.randn(2, 4, 5, 8))


def test_projector_rejects_a_layer_axis_in_place_of_heads():
    proj = KVProjector(4, 2, Dt=8, Ds=8)
    with pytest.raises(ValueError, match=r"expected teacher values of shape \(B, 4, T, 8\), got \(6, 2, 4, 5, 8\)"):
        proj(torch.randn(2, 4, 5, 8), torch.randn(6, 2, 4, 5, 8))


def test_projector_rejects_mismatched_keys_and_values():
    proj = KVProjector(4, 2, Dt=8, Ds=8)
    with pytest.raises(ValueError, match="differ in batch or time"):
        proj(torch.randn(2, 4, 5, 8), torch.randn(2, 4, 6, 8))


def test_projector_rejects_unknown_kind():
    with pytest.raises(ValueError, match="kind must be one of"):
        KVProjector(4, 2, 8, 8, kind="mlp")


def test_projector_rejects_empty_axes():
    with pytest.raises(ValueError, match="Ht=0, Hs=2, Dt=8, Ds=8"):
        KVProjector(0, 2, 8, 8)
