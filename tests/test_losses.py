import pytest
import torch

from kvlib.losses import kv_distance, kv_loss, kv_scales, relation_loss
from kvlib.train import gradient_shares


def kv(B=2, H=3, T=5, D=4):
    return torch.randn(B, H, T, D)


@pytest.mark.parametrize("kind", ["mse", "l1", "smooth_l1", "cosine"])
def test_distance_to_itself_is_zero(kind):
    x = kv()
    assert kv_distance(x, x.clone(), torch.ones(2, 5), kind).item() == pytest.approx(0.0, abs=1e-6)


def test_mse_and_l1_match_their_closed_forms():
    pred, target = torch.zeros(1, 1, 2, 2), torch.tensor([[[[1.0, 3.0], [2.0, 2.0]]]])
    mask = torch.ones(1, 2)
    assert kv_distance(pred, target, mask, "mse").item() == pytest.approx((1 + 9 + 4 + 4) / 4)
    assert kv_distance(pred, target, mask, "l1").item() == pytest.approx((1 + 3 + 2 + 2) / 4)
    assert kv_distance(pred, target, mask, "smooth_l1").item() == pytest.approx((0.5 + 2.5 + 1.5 + 1.5) / 4)


def test_cosine_distance_ignores_scale_and_is_two_for_opposites():
    x = kv()
    mask = torch.ones(2, 5)
    assert kv_distance(3 * x, x, mask, "cosine").item() == pytest.approx(0.0, abs=1e-6)
    assert kv_distance(-x, x, mask, "cosine").item() == pytest.approx(2.0, abs=1e-6)


def test_padding_positions_do_not_count():
    pred, target = kv(), kv()
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    garbage = pred.clone()
    garbage[0, :, 3:] = 1e6
    torch.testing.assert_close(kv_distance(garbage, target, mask), kv_distance(pred, target, mask))


def test_per_head_mask_selects_heads():
    pred, target = kv(), kv()
    mask = torch.zeros(2, 3, 5, dtype=torch.bool)
    mask[:, 1] = True
    torch.testing.assert_close(
        kv_distance(pred, target, mask), kv_distance(pred[:, 1:2], target[:, 1:2], torch.ones(2, 5))
    )


@pytest.mark.parametrize("kind", ["mse", "l1", "smooth_l1", "cosine"])
def test_normalisation_makes_each_side_scale_and_shift_free(kind):
    """A collapse cannot lower the loss: scaling (or shifting) either side alone leaves it unchanged. In float32
    the standardised tensors differ from the unscaled ones by a few ulps (one mean, one std, one division), so
    relative 1e-5 is ~100 ulps of headroom (shifts are made at the data's own scale: a shift of 5 on data of std
    1e-3 would lose ulp(5) / 1e-3 ~ 5e-4 to rounding before the loss is computed); a side left unstandardised
    changes the loss by O(1)."""
    pred, target = kv(), kv()
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    base = kv_distance(pred, target, mask, kind, normalize=True)
    for c in (1e-3, 0.1, 30.0):
        for p, t in ((c * pred, target), (pred, c * target), (c * (pred + 5), c * (target - 2))):
            torch.testing.assert_close(kv_distance(p, t, mask, kind, normalize=True), base, rtol=1e-5, atol=1e-6)
    assert kv_distance(0.1 * pred, target, mask, kind, normalize=False) != pytest.approx(base.item(), rel=1e-3)


def test_no_gradient_toward_a_smaller_scale_on_either_side():
    """d loss / d scale is 0 for a scale on the student or on the (projected) target. The earlier rule, both
    sides divided by the target's detached std, has a non-zero one on the target side (a projector could
    shrink its output to lower the loss): computed here too, so the test separates the two rules."""
    pred, target = kv(), kv()
    mask = torch.ones(2, 5)
    for side in ("student", "target"):
        scale = torch.ones((), requires_grad=True)
        p, t = (scale * pred, target) if side == "student" else (pred, scale * target)
        kv_distance(p, t, mask, "mse", normalize=True).backward()
        assert abs(scale.grad.item()) < 1e-5, side
    scale = torch.ones((), requires_grad=True)
    t = scale * target
    std = t.std(unbiased=False).detach()
    ((pred / std - t / std) ** 2).mean().backward()
    assert abs(scale.grad.item()) > 0.1


def test_kv_scales_are_the_masked_standard_deviations():
    pair = [(kv(), 3 * kv()), (0.5 * kv(), kv())]
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]).bool()
    got = kv_scales(pair, mask)
    assert got.shape == (2, 2) and not got.requires_grad
    for layer, (k, v) in enumerate(pair):
        for j, x in enumerate((k, v)):
            real = x.permute(0, 2, 1, 3)[mask]  # (positions, H, D)
            torch.testing.assert_close(got[layer, j], real.std(unbiased=False), rtol=1e-5, atol=0)


def test_kv_loss_uses_keys_and_values_with_their_weights():
    student = [(kv(), kv()) for _ in range(2)]
    target = [(k.clone(), torch.zeros_like(v)) for k, v in student]
    mask = torch.ones(2, 5)
    total, per_layer = kv_loss(student, target, mask, normalize=False)
    expected = torch.stack([v.square().mean() for _, v in student])
    torch.testing.assert_close(per_layer, expected)
    torch.testing.assert_close(total, expected.mean())
    only_k, _ = kv_loss(student, target, mask, v_weight=0.0, normalize=False)
    assert only_k.item() == pytest.approx(0.0, abs=1e-7)


def test_kv_loss_gradient_reaches_both_sides():
    s, t = kv().requires_grad_(), kv().requires_grad_()
    kv_loss([(s, s)], [(t, t)], torch.ones(2, 5))[0].backward()
    assert s.grad.abs().sum() > 0 and t.grad.abs().sum() > 0


def test_loss_is_float32_for_half_inputs():
    x, y = kv().bfloat16(), kv().half()
    assert kv_distance(x, y.bfloat16(), torch.ones(2, 5)).dtype == torch.float32


def test_relation_loss_is_zero_for_the_same_relations_across_head_layouts():
    x = torch.randn(2, 4, 6, 8)  # H*D = 32
    regrouped = x.transpose(1, 2).reshape(2, 6, 2, 16).transpose(1, 2)  # the same features as 2 heads of 16
    assert relation_loss(regrouped, x, torch.ones(2, 6), num_relation_heads=4).item() == pytest.approx(0.0, abs=1e-6)
    assert relation_loss(torch.randn(2, 1, 6, 8), x, torch.ones(2, 6), num_relation_heads=4).item() > 0


def test_relation_loss_ignores_padding():
    s, t = torch.randn(1, 2, 6, 8), torch.randn(1, 3, 6, 8)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0]])
    s2 = s.clone()
    s2[:, :, 4:] = 50.0
    torch.testing.assert_close(relation_loss(s2, t, mask, 4), relation_loss(s, t, mask, 4))
    torch.testing.assert_close(relation_loss(s, t, mask, 4), relation_loss(s[:, :, :4], t[:, :, :4], mask[:, :4], 4))


def test_gradient_shares_sum_to_one_and_follow_the_weights():
    w = torch.nn.Parameter(torch.randn(5))
    a, b = (w**2).sum(), w.sum()
    shares = gradient_shares({"a": a, "b": 3 * b}, [w])
    assert sum(shares.values()) == pytest.approx(1.0)
    ga, gb = (2 * w).norm().item(), 3 * 5**0.5
    assert shares["a"] == pytest.approx(ga / (ga + gb), rel=1e-5)
    (a + b).backward()  # the graph is kept for the real step
    assert w.grad is not None


def test_gradient_shares_count_a_term_that_does_not_reach_the_params_as_zero():
    w, other = torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(3))
    shares = gradient_shares({"a": w.sum(), "elsewhere": other.sum()}, [w])
    assert shares == {"a": 1.0, "elsewhere": 0.0}


def test_kv_distance_rejects_unknown_kind():
    with pytest.raises(ValueError, match="kind must be one of"):
        kv_distance(kv(), kv(), torch.ones(2, 5), "huber")


def test_kv_distance_rejects_unaligned_shapes():
    with pytest.raises(ValueError, match=r"pred \(2, 3, 5, 4\) and target \(2, 3, 7, 4\) must have the same"):
        kv_distance(kv(), kv(T=7), torch.ones(2, 5))


def test_kv_distance_rejects_mask_of_other_length():
    with pytest.raises(ValueError, match=r"mask of shape \(2, 4\) does not fit KV of shape \(2, 3, 5, 4\)"):
        kv_distance(kv(), kv(), torch.ones(2, 4))


def test_kv_loss_rejects_different_layer_counts():
    with pytest.raises(ValueError, match="student has 1 layers but the target 2"):
        kv_loss([(kv(), kv())], [(kv(), kv())] * 2, torch.ones(2, 5))


def test_kv_loss_rejects_zero_weights():
    with pytest.raises(ValueError, match="k_weight=0.0 and v_weight=0.0"):
        kv_loss([(kv(), kv())], [(kv(), kv())], torch.ones(2, 5), k_weight=0.0, v_weight=0.0)


def test_relation_loss_rejects_indivisible_relation_heads():
    with pytest.raises(ValueError, match=r"H\*D = 3\*4 = 12 is not divisible by num_relation_heads=5"):
        relation_loss(kv(), kv(), torch.ones(2, 5), 5)


def test_relation_loss_rejects_unaligned_time():
    with pytest.raises(ValueError, match="same B and T"):
        relation_loss(kv(), kv(T=6), torch.ones(2, 5), 2)


def test_gradient_shares_rejects_no_terms():
    with pytest.raises(ValueError, match="at least one loss term"):
        gradient_shares({}, [])
