import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kvlib.fusion import KINDS, fuse, make_fusion, mean_entropy

B, H, T, D, HID, L, TASKS = 2, 2, 6, 4, 8, 3, 2
FIXED = {n: [(i + 1) / (n * (n + 1) / 2) for i in range(n)] for n in (1, 2, 3, 5)}  # 1 : 2 : ... : n, summing to 1


@pytest.fixture(autouse=True)
def _one_thread():
    """These tensors are tiny: on a shared CPU, handing them between threads costs far more than the math."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def build(kind, n, **kw):
    """A fusion of the given kind with random (non-uniform) parameters."""
    if kind == "fixed":
        kw.setdefault("fixed_weights", FIXED[n])
    f = make_fusion(kind, n, L, HID, TASKS, **kw)
    with torch.no_grad():
        for p in f.parameters():
            p.normal_()
    return f


def without(f, kind, n, j):
    """The same fusion built for the n - 1 teachers other than teacher j."""
    keep = [i for i in range(n) if i != j]
    kept = [FIXED[n][i] / sum(FIXED[n][k] for k in keep) for i in keep] if kind == "fixed" else None
    g = make_fusion(kind, n - 1, L, HID, TASKS, fixed_weights=kept)
    if kind == "task":
        g.logits.data = f.logits.data[..., keep]
    if kind == "router":
        g.load_state_dict(
            f.state_dict()
            | {
                "net.3.weight": f.net[-1].weight.data.view(L, n, -1)[:, keep].reshape(L * (n - 1), -1),
                "net.3.bias": f.net[-1].bias.data.view(L, n)[:, keep].reshape(-1),
            }
        )
    return g


def teachers(n):
    return [(torch.randn(B, H, T, D), torch.randn(B, H, T, D)) for _ in range(n)]


def staggered_masks(n):
    """Teacher i covers positions [i + b, i + b + 3) of example b, never the last one: overlaps, single
    coverage and uncovered positions all occur."""
    t = torch.arange(T)
    return [
        torch.stack([(t >= i + b) & (t < min(i + b + 3, T - 1)) for b in range(B)])  # (B, T)
        for i in range(n)
    ]


def student(**kw):
    ctx = {
        "student_kv": (torch.randn(B, H, T, D), torch.randn(B, H, T, D)),
        "student_h": torch.randn(B, T, HID),
        "student_q": torch.randn(B, H, T, D),
        "task_ids": torch.tensor([0, 1]),
        "layer": 1,
    }
    return ctx | kw


def per_position(w, masks_or_cover):
    """(B, N, T) effective weights: w (B, N) or (B, N, T) times coverage, renormalised per position."""
    cover = masks_or_cover.float()
    w = (w if w.dim() == 3 else w[:, :, None]) * cover
    return w / w.sum(1, keepdim=True).clamp(min=1e-30)


def cover_of(kvs, masks):
    full, none = torch.ones(B, T, dtype=torch.bool), torch.zeros(B, T, dtype=torch.bool)
    return torch.stack([none if kv is None else full if m is None else m for kv, m in zip(kvs, masks)], 1)  # (B, N, T)


# fuse


def test_fuse_gives_the_weighted_mean_golden_value():
    kvs = [(torch.full((B, H, T, D), 1.0), torch.full((B, H, T, D), -1.0)), (torch.full((B, H, T, D), 3.0),) * 2]
    k, v, mask = fuse(kvs, [None, None], torch.tensor([[1.0, 3.0]]).expand(B, 2))
    torch.testing.assert_close(k, torch.full((B, H, T, D), 2.5))  # 0.25 * 1 + 0.75 * 3
    torch.testing.assert_close(v, torch.full((B, H, T, D), 2.0))  # 0.25 * -1 + 0.75 * 3
    assert mask.all()


def test_fuse_renormalises_over_the_teachers_that_cover_a_position():
    kvs = [(torch.full((1, H, 3, D), 1.0),) * 2, (torch.full((1, H, 3, D), 3.0),) * 2]
    masks = [torch.tensor([[True, True, False]]), torch.tensor([[False, True, False]])]
    k, _, mask = fuse(kvs, masks, torch.tensor([[1.0, 3.0]]))
    assert mask.tolist() == [[True, True, False]]
    torch.testing.assert_close(k[0, :, :, 0], torch.tensor([[1.0, 2.5, 0.0]] * H))


def test_fuse_matches_a_naive_loop_over_positions():
    n = 3
    kvs, masks = teachers(n), staggered_masks(n)
    kvs[1] = None
    w = torch.rand(B, n, T)
    k, v, mask = fuse(kvs, masks, w)
    for b in range(B):
        for t in range(T):
            have = [i for i in range(n) if kvs[i] is not None and masks[i][b, t]]
            assert mask[b, t] == bool(have)
            ref_k, ref_v = torch.zeros(H, D), torch.zeros(H, D)
            for i in have:
                share = w[b, i, t] / sum(w[b, j, t] for j in have)
                ref_k, ref_v = ref_k + share * kvs[i][0][b, :, t], ref_v + share * kvs[i][1][b, :, t]
            torch.testing.assert_close(k[b, :, t], ref_k)
            torch.testing.assert_close(v[b, :, t], ref_v)


def test_fuse_treats_a_zero_weight_teacher_as_not_covering():
    kvs = teachers(2)
    k, _, mask = fuse(kvs, [None, torch.zeros(B, T, dtype=torch.bool)], torch.tensor([[0.0, 1.0]]).expand(B, 2))
    assert not mask.any() and not k.any()


# invariants every kind keeps


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_fusing_one_teacher_returns_it_unchanged_where_it_covers(kind, n):
    f = build(kind, n)
    kvs, masks = [None] * n, [None] * n
    only = n - 1
    kvs[only], masks[only] = teachers(1)[0], staggered_masks(1)[0]
    k, v, mask, w = f(kvs, masks, **student())
    cover = masks[only][:, None, :, None]  # (B, 1, T, 1)
    torch.testing.assert_close(k, kvs[only][0] * cover, rtol=0, atol=0)
    torch.testing.assert_close(v, kvs[only][1] * cover, rtol=0, atol=0)
    assert torch.equal(mask, masks[only])
    assert torch.equal(per_position(w, cover_of(kvs, masks))[:, only], masks[only].float())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", [2, 3, 5])
def test_weights_are_non_negative_sum_to_one_and_skip_missing_teachers(kind, n):
    f = build(kind, n)
    kvs, masks = teachers(n), staggered_masks(n)
    kvs[1] = None
    _, _, _, w = f(kvs, masks, **student())
    cover = cover_of(kvs, masks)  # (B, N, T)
    avail = cover if w.dim() == 3 else cover.any(-1)  # where a teacher may get weight
    assert w.shape == ((B, n, T) if kind == "attention" else (B, n))
    assert (w >= 0).all() and not w[~avail].any() and not w[:, 1].any()
    torch.testing.assert_close(w.sum(1), avail.any(1).float())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", [2, 3, 5])
def test_a_missing_teacher_gives_the_same_result_as_fusing_the_others(kind, n):
    f = build(kind, n)
    kvs, masks, ctx = teachers(n), staggered_masks(n), student()
    j = 1
    kvs[j] = None
    k, v, mask, w = f(kvs, masks, **ctx)
    others = [i for i in range(n) if i != j]
    k2, v2, mask2, w2 = without(f, kind, n, j)([kvs[i] for i in others], [masks[i] for i in others], **ctx)
    torch.testing.assert_close(k, k2)
    torch.testing.assert_close(v, v2)
    assert torch.equal(mask, mask2)
    torch.testing.assert_close(w[:, others], w2)
    assert not w[:, j].any()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", [2, 3, 5])
def test_masks_are_honoured_and_the_fused_mask_is_their_union(kind, n):
    f = build(kind, n)
    kvs, masks = teachers(n), staggered_masks(n)
    k, v, mask, w = f(kvs, masks, **student())
    cover = cover_of(kvs, masks)
    assert torch.equal(mask, cover.any(1))
    eff = per_position(w, cover)  # (B, N, T): what each teacher contributes at each position
    assert not eff[~cover].any()
    torch.testing.assert_close(k, torch.einsum("bnt,nbhtd->bhtd", eff, torch.stack([kv[0] for kv in kvs])))
    torch.testing.assert_close(v, torch.einsum("bnt,nbhtd->bhtd", eff, torch.stack([kv[1] for kv in kvs])))
    alone = cover.sum(1) == 1  # (B, T): a single teacher covers the position
    assert alone.any()
    who = cover.float().argmax(1)  # (B, T)
    for b, t in alone.nonzero().tolist():
        torch.testing.assert_close(k[b, :, t], kvs[who[b, t]][0][b, :, t], rtol=0, atol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_values_outside_a_teachers_mask_change_nothing(kind):
    f = build(kind, 3)
    kvs, masks, ctx = teachers(3), staggered_masks(3), student()
    out = f(kvs, masks, **ctx)
    garbage = [tuple(x.masked_fill(~m[:, None, :, None], float("nan")) for x in kv) for kv, m in zip(kvs, masks)]
    for a, b in zip(out, f(garbage, masks, **ctx)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("kind", KINDS)
def test_routing_sends_no_gradient_into_the_student(kind):
    f = build(kind, 2)
    ctx = student()
    for x in (*ctx["student_kv"], ctx["student_h"], ctx["student_q"]):
        x.requires_grad_(True)
    kvs = [tuple(x.requires_grad_(True) for x in kv) for kv in teachers(2)]
    k, v, _, w = f(kvs, [None, None], **ctx)
    ((k - 1) ** 2 + v**2).sum().backward()
    assert all(x.grad is None for x in (*ctx["student_kv"], ctx["student_h"], ctx["student_q"]))
    assert all(x.grad is not None and x.grad.abs().sum() > 0 for kv in kvs for x in kv)


@pytest.mark.parametrize("kind", ["task", "router"])
def test_learned_weights_change_after_one_step(kind):
    f = make_fusion(kind, 2, L, HID, TASKS)
    before = [p.detach().clone() for p in f.parameters()]
    k, v, _, _ = f(teachers(2), [None, None], **student())
    ((k - 1) ** 2 + v**2).sum().backward()
    torch.optim.SGD(f.parameters(), lr=0.1).step()
    assert any(not torch.equal(p, q) for p, q in zip(f.parameters(), before))


# golden values per kind


def test_fixed_weights_are_used_as_given_and_default_to_uniform():
    kvs = teachers(3)
    _, _, _, w = make_fusion("fixed", 3, L, HID, TASKS, fixed_weights=[0.25, 0.0, 0.75])(kvs, [None] * 3, **student())
    torch.testing.assert_close(w, torch.tensor([[0.25, 0.0, 0.75]] * B))
    _, _, _, w = make_fusion("fixed", 3, L, HID, TASKS)(kvs, [None] * 3, **student())
    torch.testing.assert_close(w, torch.full((B, 3), 1 / 3))
    assert not list(make_fusion("fixed", 3, L, HID, TASKS).parameters())


def test_similarity_weights_are_a_softmax_of_cosines_over_temperature():
    k, v = torch.randn(B, H, T, D), torch.randn(B, H, T, D)
    kvs = [(k, v), (-k, -v), (torch.zeros(B, H, T, D), torch.zeros(B, H, T, D))]  # cos 1, -1 and 0
    f = make_fusion("similarity", 3, L, HID, TASKS, temperature=0.5)
    _, _, _, w = f(kvs, [None] * 3, **student(student_kv=(2 * k, 2 * v)))
    torch.testing.assert_close(w, torch.tensor([2.0, -2.0, 0.0]).softmax(0).expand(B, 3))


def test_similarity_pools_the_student_over_covered_positions_and_each_teacher_over_its_own():
    kvs, masks, ctx = teachers(2), staggered_masks(2), student()
    _, _, _, w = make_fusion("similarity", 2, L, HID, TASKS)(kvs, masks, **ctx)

    def pool(kv, m):
        x = torch.cat(kv, -1).mean(1)  # (B, T, 2D)
        return (x * m[..., None]).sum(1) / m.sum(1, keepdim=True)

    s = pool(ctx["student_kv"], masks[0] | masks[1])
    cos = torch.stack([F.cosine_similarity(s, pool(kv, m), dim=-1) for kv, m in zip(kvs, masks)], dim=1)  # (B, N)
    torch.testing.assert_close(w, cos.softmax(1))


def test_attention_weights_follow_query_key_agreement_per_position():
    a = 2.0
    e = torch.zeros(D)
    e[0] = 1.0
    k0 = e.expand(B, H, T, D).clone()
    q = k0 * a * math.sqrt(D)
    q[:, :, T // 2 :] *= -1  # the second half of the positions prefers teacher 1
    kvs = [(k0, torch.randn(B, H, T, D)), (torch.zeros(B, H, T, D), torch.randn(B, H, T, D))]
    _, _, _, w = make_fusion("attention", 2, L, HID, TASKS)(kvs, [None, None], **student(student_q=q))
    p = torch.sigmoid(torch.tensor(a))  # softmax([a, 0])[0]
    expected = torch.cat([p.expand(T // 2), (1 - p).expand(T - T // 2)])
    torch.testing.assert_close(w[:, 0], expected.expand(B, T))


def test_attention_fusion_averages_per_head_softmaxes():
    kvs, q = teachers(2), torch.randn(B, H, T, D)
    _, _, _, w = make_fusion("attention", 2, L, HID, TASKS, temperature=2.0)(kvs, [None, None], **student(student_q=q))
    scores = torch.stack([(q * kv[0]).sum(-1) for kv in kvs], -1) / math.sqrt(D) / 2.0  # (B, H, T, N)
    torch.testing.assert_close(w, scores.softmax(-1).mean(1).transpose(1, 2))


def test_task_weights_start_uniform_and_are_per_task_and_layer():
    f = make_fusion("task", 2, L, HID, TASKS)
    kvs = teachers(2)
    _, _, _, w = f(kvs, [None, None], **student())
    torch.testing.assert_close(w, torch.full((B, 2), 0.5))
    with torch.no_grad():
        f.logits[1, 2] = torch.tensor([1.0, 3.0]).log()
    _, _, _, w = f(kvs, [None, None], **student(layer=2))
    torch.testing.assert_close(w, torch.tensor([[0.5, 0.5], [0.25, 0.75]]))  # task_ids = [0, 1]
    _, _, _, w = f(kvs, [None, None], **student(layer=1))
    torch.testing.assert_close(w, torch.full((B, 2), 0.5))


def test_router_starts_uniform_and_gives_per_layer_weights():
    f = make_fusion("router", 2, L, HID, TASKS)
    kvs = teachers(2)
    _, _, _, w = f(kvs, [None, None], **student())
    torch.testing.assert_close(w, torch.full((B, 2), 0.5))
    with torch.no_grad():
        f.net[-1].bias.view(L, 2)[2] = torch.tensor([1.0, 3.0]).log()
    _, _, _, w = f(kvs, [None, None], **student(layer=2))
    torch.testing.assert_close(w, torch.tensor([[0.25, 0.75]] * B))
    _, _, _, w = f(kvs, [None, None], **student(layer=0))
    torch.testing.assert_close(w, torch.full((B, 2), 0.5))


def test_router_ignores_hidden_states_outside_the_covered_positions():
    f = build("router", 2)
    kvs, masks, ctx = teachers(2), staggered_masks(2), student()
    _, _, _, w = f(kvs, masks, **ctx)
    h = ctx["student_h"].masked_fill(~(masks[0] | masks[1])[..., None], 1e4)
    _, _, _, w2 = f(kvs, masks, **ctx | {"student_h": h})
    torch.testing.assert_close(w, w2)


# entropy regulariser


def test_mean_entropy_golden_values():
    torch.testing.assert_close(mean_entropy(torch.full((3, 4), 0.25)), torch.tensor(math.log(4)))
    torch.testing.assert_close(mean_entropy(torch.tensor([[1.0, 0.0], [0.0, 1.0]])), torch.tensor(0.0))
    h = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    mixed = torch.tensor([[0.25, 0.75], [0.5, 0.5]])
    torch.testing.assert_close(mean_entropy(mixed), torch.tensor((h + math.log(2)) / 2))


def test_aux_loss_is_zero_without_entropy_weight_and_for_other_kinds():
    for kind in KINDS:
        f = build(kind, 2)
        f(teachers(2), [None, None], **student())
        assert isinstance(f.aux_loss, torch.Tensor) and f.aux_loss.item() == 0


def test_aux_loss_is_the_weighted_entropy_of_the_router_weights():
    f = build("router", 3, entropy_weight=0.3)
    _, _, _, w = f(teachers(3), [None] * 3, **student())
    torch.testing.assert_close(f.aux_loss, 0.3 * mean_entropy(w))
    assert f.aux_loss.requires_grad


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_positive_entropy_weight_specialises_and_negative_mixes(sign):
    f = make_fusion("router", 3, L, HID, TASKS, entropy_weight=sign * 0.5)
    with torch.no_grad():
        f.net[-1].weight.normal_(std=0.3)
    kvs, ctx = teachers(3), student()
    _, _, _, w0 = f(kvs, [None] * 3, **ctx)
    opt = torch.optim.SGD(f.parameters(), lr=0.1)
    for _ in range(10):
        f(kvs, [None] * 3, **ctx)
        opt.zero_grad()
        f.aux_loss.backward()
        opt.step()
    _, _, _, w1 = f(kvs, [None] * 3, **ctx)
    assert sign * (mean_entropy(w1) - mean_entropy(w0)) < -0.05


# routing learns to avoid a noise teacher


def kv_of(x):
    """(B, T, 2 * H * D) -> K, V (B, H, T, D) each."""
    k, v = x.view(x.shape[0], x.shape[1], 2, H, D).permute(2, 0, 3, 1, 4)  # (2, B, H, T, D)
    return k, v


def train_against_noise(kind, noise_teacher, steps=200, n=16, seed=0):
    """Train a linear student and the fusion jointly on MSE to the fused target; teacher noise_teacher(task)
    is fresh noise, the other one a fixed linear function of the student's hidden state."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(HID, 2 * H * D, generator=g) / math.sqrt(HID)
    f = make_fusion(kind, 2, 1, HID, 2)
    pred = nn.Linear(HID, 2 * H * D)
    opt = torch.optim.Adam([*f.parameters(), *pred.parameters()], lr=0.03)
    tasks = torch.arange(n) % 2

    def step():
        h = torch.randn(n, T, HID, generator=g)
        good, noise = kv_of(h @ W), kv_of(torch.randn(n, T, 2 * H * D, generator=g))
        is_noise = (noise_teacher(tasks) == torch.arange(2)[:, None]).view(2, n, 1, 1, 1)  # (N, B, 1, 1, 1)
        kvs = [tuple(torch.where(is_noise[i], x_n, x_g) for x_n, x_g in zip(noise, good)) for i in range(2)]
        k_s, v_s = kv_of(pred(h))
        k, v, _, w = f(kvs, [None, None], student_kv=(k_s, v_s), student_h=h, student_q=None, task_ids=tasks, layer=0)
        return F.mse_loss(k_s, k) + F.mse_loss(v_s, v), w

    for _ in range(steps):
        loss, _ = step()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return step()[1], tasks


def test_router_learns_to_drop_a_noise_teacher():
    w, _ = train_against_noise("router", lambda tasks: torch.ones_like(tasks))
    assert w[:, 1].mean() < 0.2


def test_task_fusion_learns_a_different_teacher_per_task():
    w, tasks = train_against_noise("task", lambda tasks: 1 - tasks)  # task 0: teacher 1 is noise; task 1: teacher 0
    assert w[tasks == 0, 1].max() < 0.2 and w[tasks == 1, 0].max() < 0.2


# errors


def test_unknown_kind_is_rejected():
    with pytest.raises(ValueError, match=r"fusion kind must be one of .*'router'\), got 'mean'"):
        make_fusion("mean", 2, L, HID, TASKS)


def test_sizes_below_one_are_rejected():
    with pytest.raises(ValueError, match="must be >= 1, got 2, 3, 8 and 0"):
        make_fusion("task", 2, 3, 8, 0)


def test_non_positive_temperature_is_rejected():
    with pytest.raises(ValueError, match="temperature must be > 0, got 0.0"):
        make_fusion("similarity", 2, L, HID, TASKS, temperature=0.0)


def test_fixed_weights_with_another_kind_are_rejected():
    with pytest.raises(ValueError, match="used only by kind='fixed', got them with kind='router'"):
        make_fusion("router", 2, L, HID, TASKS, fixed_weights=[1.0, 1.0])


def test_entropy_weight_with_another_kind_is_rejected():
    with pytest.raises(ValueError, match="used only by kind='router', got 0.1 with kind='task'"):
        make_fusion("task", 2, L, HID, TASKS, entropy_weight=0.1)


@pytest.mark.parametrize("weights", [[1.0], [1.5, -0.5], [0.0, 0.0], [0.6, 0.6], [math.nan, 1.0], [0.5, 0.5, 0.0]])
def test_bad_fixed_weights_are_rejected(weights):
    with pytest.raises(ValueError, match=r"fixed_weights must be 2 non-negative numbers .* got \["):
        make_fusion("fixed", 2, L, HID, TASKS, fixed_weights=weights)


def test_the_wrong_number_of_teachers_is_rejected():
    with pytest.raises(ValueError, match="got 3 teacher KVs but this fusion was built for 2 teachers"):
        build("fixed", 2)(teachers(3), [None] * 3, **student())


def test_a_mask_list_of_another_length_is_rejected():
    with pytest.raises(ValueError, match="got 2 teacher KVs but 1 masks"):
        build("fixed", 2)(teachers(2), [None], **student())


@pytest.mark.parametrize("kind", KINDS)
def test_all_teachers_missing_is_rejected(kind):
    with pytest.raises(ValueError, match="all 2 teachers are None"):
        build(kind, 2)([None, None], [None, None], **student())


def test_teachers_of_different_shapes_are_rejected_by_index():
    kvs = teachers(3)
    kvs[2] = (kvs[2][0], torch.randn(B, H, T + 1, D))
    with pytest.raises(ValueError, match=r"teacher 2 has K \(2, 2, 6, 4\) and V \(2, 2, 7, 4\) but teacher 0's K"):
        build("fixed", 3)(kvs, [None] * 3, **student())
    with pytest.raises(ValueError, match=r"teacher 2 has K .* align every teacher"):
        fuse(kvs, [None] * 3, torch.ones(B, 3))


def test_kv_that_is_not_four_dimensional_is_rejected():
    with pytest.raises(ValueError, match=r"must be \(B, Hs, Ts, Ds\), got teacher 1's K of shape \(2, 6, 4\)"):
        fuse([None, (torch.randn(B, T, D),) * 2], [None, None], torch.ones(B, 2))


def test_a_mask_of_the_wrong_shape_is_rejected():
    with pytest.raises(ValueError, match=r"teacher 1's mask has shape \(2, 5\), expected \(B, Ts\) = \(2, 6\)"):
        fuse(teachers(2), [None, torch.ones(B, T - 1, dtype=torch.bool)], torch.ones(B, 2))


def test_fuse_rejects_weights_of_the_wrong_shape():
    with pytest.raises(ValueError, match=r"weights must be \(B, N\) = \(2, 2\) .* got \(2, 3\)"):
        fuse(teachers(2), [None, None], torch.ones(B, 3))


def test_fuse_rejects_negative_weights():
    with pytest.raises(ValueError, match="non-negative, got a minimum of -1"):
        fuse(teachers(2), [None, None], torch.tensor([[1.0, -1.0]]).expand(B, 2))


def test_task_ids_out_of_range_are_rejected():
    with pytest.raises(ValueError, match=r"values in \[0, 2\), got shape \(2,\) and values \[0, 2\]"):
        build("task", 2)(teachers(2), [None, None], **student(task_ids=torch.tensor([0, 2])))


@pytest.mark.parametrize("kind", ["task", "router"])
def test_a_layer_out_of_range_is_rejected(kind):
    with pytest.raises(ValueError, match="layer 3 is out of range for a fusion built for 3 student layers"):
        build(kind, 2)(teachers(2), [None, None], **student(layer=3))


def test_similarity_rejects_a_student_kv_of_another_shape():
    with pytest.raises(ValueError, match=r"student K \(2, 2, 5, 4\) .* must match the teachers' \(2, 2, 6, 4\)"):
        build("similarity", 2)(teachers(2), [None, None], **student(student_kv=(torch.randn(B, H, T - 1, D),) * 2))


@pytest.mark.parametrize("q", [None, torch.randn(B, H + 1, T, D)])
def test_attention_needs_student_queries_of_the_kv_shape(q):
    with pytest.raises(ValueError, match=r"needs student_q of shape \(2, 2, 6, 4\)"):
        build("attention", 2)(teachers(2), [None, None], **student(student_q=q))


def test_router_rejects_hidden_states_of_another_size():
    with pytest.raises(ValueError, match=r"student_h must be \(B, Ts, hidden\) = \(2, 6, 8\), got \(2, 6, 5\)"):
        build("router", 2)(teachers(2), [None, None], **student(student_h=torch.randn(B, T, 5)))
