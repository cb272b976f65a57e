import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from kvlib.compress import crop_slots, gather_slots, importance, kava_scores, redundancy, select_slots
from kvlib.models import model_config

# importance


def test_importance_sums_observer_rows_max_pools_query_groups_and_normalises():
    # B=1, Hq=4 query heads onto H=2 KV heads, T=4; queries 2 and 3 observe, keys 0 and 1 are eligible.
    rows = {  # per query head: attention rows of queries 2 and 3 (rows 0 and 1 are not observers)
        0: [[0.5, 0.3, 0.2, 0.0], [0.1, 0.2, 0.3, 0.4]],
        1: [[0.1, 0.6, 0.3, 0.0], [0.2, 0.1, 0.3, 0.4]],
        2: [[0.2, 0.2, 0.6, 0.0], [0.4, 0.1, 0.1, 0.4]],
        3: [[0.7, 0.1, 0.2, 0.0], [0.1, 0.1, 0.4, 0.4]],
    }
    attn = torch.zeros(1, 4, 4, 4)
    attn[:, :, 0] = torch.tensor([1.0, 0.0, 0.0, 0.0])  # non-observers put all their mass on key 0
    attn[:, :, 1] = torch.tensor([0.5, 0.5, 0.0, 0.0])
    for h, (r2, r3) in rows.items():
        attn[0, h, 2], attn[0, h, 3] = torch.tensor(r2), torch.tensor(r3)
    query_mask = torch.tensor([[False, False, True, True]])
    key_mask = torch.tensor([[True, True, False, False]])
    # observer sums on keys 0, 1: head 0 (0.6, 0.5), head 1 (0.3, 0.7) -> max (0.6, 0.7);
    # head 2 (0.6, 0.3), head 3 (0.8, 0.2) -> max (0.8, 0.3)
    expected = torch.tensor([[[0.6 / 1.3, 0.7 / 1.3, 0, 0], [0.8 / 1.1, 0.3 / 1.1, 0, 0]]])
    torch.testing.assert_close(importance(attn, query_mask, key_mask, num_kv_heads=2), expected)


def test_importance_of_mha_is_the_normalised_observer_mass():
    attn = torch.softmax(torch.randn(2, 3, 5, 5), dim=-1)
    query_mask = torch.tensor([[0, 0, 0, 1, 1], [0, 0, 0, 0, 1]])
    key_mask = torch.ones(2, 5, dtype=torch.bool)
    mass = (attn * query_mask[:, None, :, None]).sum(2)
    torch.testing.assert_close(importance(attn, query_mask, key_mask, 3), mass / mass.sum(-1, keepdim=True))


def test_importance_ignores_nan_rows_of_padded_queries_and_is_zero_without_observers():
    attn = torch.softmax(torch.randn(2, 2, 4, 4), dim=-1)
    attn[:, :, 0] = float("nan")
    query_mask = torch.tensor([[False, True, True, False], [False, False, False, False]])
    i = importance(attn, query_mask, torch.ones(2, 4, dtype=torch.bool), 1)
    torch.testing.assert_close(i[0].sum(-1), torch.ones(1))
    assert torch.equal(i[1], torch.zeros(1, 4))


def test_importance_of_a_real_gqa_model_is_a_distribution_over_eligible_keys():
    config = model_config("llama", num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8, hidden_size=32, vocab_size=50)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    ids = torch.randint(0, 50, (2, 9))
    with torch.no_grad():
        attn = model(input_ids=ids, output_attentions=True).attentions[0]
    query_mask = torch.arange(9).expand(2, 9) >= 6  # the "answer" observes
    key_mask = (torch.arange(9) >= 1) & (torch.arange(9) < 6)  # the "reasoning" is eligible
    i = importance(attn, query_mask, key_mask.expand(2, 9), num_kv_heads=2)
    assert i.shape == (2, 2, 9)
    torch.testing.assert_close(i.sum(-1), torch.ones(2, 2))
    assert (i[..., ~key_mask] == 0).all() and (i[..., key_mask] > 0).all()


def test_importance_reads_only_observer_rows_and_equals_the_dense_sum():
    g = torch.Generator().manual_seed(1)
    attn = torch.softmax(torch.randn(3, 6, 10, 10, generator=g), dim=-1)
    observers = torch.rand(3, 10, generator=g) > 0.6
    observers[2] = False  # an example without observers
    attn[0, :, ~observers[0]] = float("nan")  # rows nobody observes (e.g. padded queries) never reach the result
    attn[2] = float("nan")
    keys = torch.rand(3, 10, generator=g) > 0.2
    dense = torch.nan_to_num(attn).masked_fill(~observers[:, None, :, None], 0).sum(2)  # (B, Hq, T)
    dense = dense.view(3, 2, 3, 10).amax(2).masked_fill(~keys[:, None], 0)
    expected = dense / dense.sum(-1, keepdim=True).clamp(min=1e-12)
    got = importance(attn, observers, keys, num_kv_heads=2)
    torch.testing.assert_close(got, expected)
    assert (got[2] == 0).all()


# redundancy


def test_redundancy_matches_a_hand_computed_case_and_ignores_ineligible_keys():
    keys = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0], [1.0, 1.0]])[None, None]  # (1, 1, 4, 2)
    key_mask = torch.tensor([[True, True, True, False]])
    # cosine: k0.k1 = 1, k0.k2 = k1.k2 = 0 -> mean over the others: 0.5, 0.5, 0
    z = 2 * math.exp(-0.5) + 1
    expected = torch.tensor([[[math.exp(-0.5) / z, math.exp(-0.5) / z, 1 / z, 0.0]]])
    torch.testing.assert_close(redundancy(keys, key_mask), expected)


def test_redundancy_equals_the_pairwise_mean_similarity_it_avoids_forming():
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(3, 2, 11, 8, generator=g)
    keys[1, :, 4] = 0  # an all-zero key has no direction
    mask = torch.rand(3, 11, generator=g) > 0.3
    unit = torch.nn.functional.normalize(keys, dim=-1)
    sim = unit @ unit.transpose(-1, -2)  # (B, H, T, T)
    others = mask[:, None, None, :] & ~torch.eye(11, dtype=torch.bool)
    mean_sim = sim.masked_fill(~others, 0).sum(-1) / others.sum(-1).clamp(min=1)
    expected = torch.softmax((-mean_sim).masked_fill(~mask[:, None], float("-inf")), -1).masked_fill(~mask[:, None], 0)
    torch.testing.assert_close(redundancy(keys, mask), expected)


def test_a_duplicated_key_is_less_valuable_than_a_unique_one():
    keys = torch.linalg.qr(torch.randn(2, 3, 16, 16)).Q[..., :6, :].clone()  # (2, 3, 6, 16) orthonormal keys
    keys[:, :, 4] = 2 * keys[:, :, 1]  # key 1 appears twice (scaled)
    r = redundancy(keys, torch.ones(2, 6, dtype=torch.bool))
    assert (r[..., [1, 4]].max(-1).values < r[..., [0, 2, 3, 5]].min(-1).values).all()
    torch.testing.assert_close(r.sum(-1), torch.ones(2, 3))


def test_redundancy_is_invariant_to_key_scale_and_a_lone_key_scores_one():
    keys = torch.randn(1, 2, 5, 4)
    mask = torch.tensor([[True, True, False, True, True]])
    torch.testing.assert_close(redundancy(3.5 * keys, mask), redundancy(keys, mask))
    lone = redundancy(keys, torch.tensor([[False, False, True, False, False]]))
    assert torch.equal(lone, torch.tensor([0.0, 0, 1, 0, 0]).expand(1, 2, 5))


def test_kava_scores_mix_importance_and_redundancy_by_lam():
    attn = torch.softmax(torch.randn(1, 4, 6, 6), dim=-1)
    keys = torch.randn(1, 2, 6, 8)
    q = torch.tensor([[0, 0, 0, 0, 1, 1]]).bool()
    k = ~q
    i, r = importance(attn, q, k, 2), redundancy(keys, k)
    torch.testing.assert_close(kava_scores(attn, keys, q, k), 0.1 * i + 0.9 * r)
    torch.testing.assert_close(kava_scores(attn, keys, q, k, lam=1.0), i)


# selection


def reference_select(scores, key_mask, budget):
    """Per (example, head) loop: the top-budget eligible positions, sorted in time, padded with (0, False)."""
    B, H, _ = scores.shape
    positions = torch.zeros(B, H, budget, dtype=torch.long)
    kept = torch.zeros(B, H, budget, dtype=torch.bool)
    for b in range(B):
        eligible = key_mask[b].nonzero().flatten().tolist()
        for h in range(H):
            best = sorted(eligible, key=lambda t: -scores[b, h, t].item())[:budget]
            positions[b, h, : len(best)] = torch.tensor(sorted(best), dtype=torch.long)
            kept[b, h, : len(best)] = True
    return positions, kept


@pytest.mark.parametrize("budget", [1, 3, 5, 9])
def test_select_slots_matches_a_per_example_and_head_loop(budget):
    scores = torch.randn(4, 3, 8)
    key_mask = torch.tensor(
        [[1, 1, 1, 1, 1, 1, 1, 1], [0, 1, 1, 0, 1, 1, 1, 0], [1, 1, 0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 0, 0]]
    ).bool()
    positions, kept = select_slots(scores, key_mask, budget)
    ref_positions, ref_kept = reference_select(scores, key_mask, budget)
    assert positions.shape == kept.shape == (4, 3, budget)
    assert positions.dtype == torch.long and kept.dtype == torch.bool
    assert torch.equal(positions, ref_positions) and torch.equal(kept, ref_kept)


def test_selected_positions_are_eligible_and_in_time_order():
    scores = torch.randn(3, 2, 20)
    key_mask = torch.rand(3, 20) > 0.4
    positions, kept = select_slots(scores, key_mask, 6)
    assert key_mask.gather(1, positions.flatten(1)).view_as(kept)[kept].all()
    inner = kept[..., 1:]
    assert (positions.diff(dim=-1)[inner] > 0).all()
    assert not (kept[..., 1:] & ~kept[..., :-1]).any()  # kept slots first, padding after


@pytest.mark.parametrize("budget", [7, 10])
def test_a_budget_of_at_least_t_keeps_every_eligible_key(budget):
    key_mask = torch.tensor([[1, 1, 1, 1, 1, 1, 1], [1, 0, 1, 1, 0, 1, 0]]).bool()
    positions, kept = select_slots(torch.randn(2, 2, 7), key_mask, budget)
    assert positions.shape == (2, 2, budget)
    for b in range(2):
        for h in range(2):
            assert positions[b, h][kept[b, h]].tolist() == key_mask[b].nonzero().flatten().tolist()
    assert (positions[~kept] == 0).all()


def test_crop_slots_keeps_the_most_recent_eligible_keys():
    key_mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0], [0, 1, 1, 0, 1, 1, 0], [1, 0, 0, 0, 0, 0, 0]]).bool()
    positions, kept = crop_slots(key_mask, 3, num_heads=2)
    assert positions.shape == (3, 2, 3)
    assert positions[:, 0].tolist() == [[2, 3, 4], [2, 4, 5], [0, 0, 0]]
    assert kept[:, 1].tolist() == [[True] * 3, [True] * 3, [True, False, False]]
    assert torch.equal(positions[:, 0], positions[:, 1])


def test_gather_slots_reads_the_selected_positions():
    x = torch.randn(2, 3, 9, 4)
    positions, _ = select_slots(torch.randn(2, 3, 9), torch.ones(2, 9, dtype=torch.bool), 4)
    y = gather_slots(x, positions)
    assert y.shape == (2, 3, 4, 4)
    for b in range(2):
        for h in range(3):
            assert torch.equal(y[b, h], x[b, h, positions[b, h]])


# errors


def test_importance_rejects_non_square_attention():
    with pytest.raises(ValueError, match=r"attn must be \(B, Hq, T, T\).*got shape \(1, 2, 3, 4\)"):
        importance(torch.rand(1, 2, 3, 4), torch.ones(1, 4), torch.ones(1, 4), 1)


@pytest.mark.parametrize("num_kv_heads", [0, 3])
def test_importance_rejects_query_heads_that_do_not_split_over_kv_heads(num_kv_heads):
    with pytest.raises(ValueError, match=f"4 query heads, which do not split evenly over num_kv_heads={num_kv_heads}"):
        importance(torch.rand(1, 4, 3, 3), torch.ones(1, 3), torch.ones(1, 3), num_kv_heads)


def test_importance_rejects_a_mask_of_the_wrong_shape():
    with pytest.raises(ValueError, match=r"query_mask must be \(B, T\) = \(2, 3\), got shape \(2, 4\)"):
        importance(torch.rand(2, 2, 3, 3), torch.ones(2, 4), torch.ones(2, 3), 1)


def test_redundancy_rejects_keys_without_a_head_axis():
    with pytest.raises(ValueError, match=r"keys must be \(B, H, T, D\), got shape \(2, 5, 4\)"):
        redundancy(torch.randn(2, 5, 4), torch.ones(2, 5))


def test_redundancy_rejects_a_key_mask_of_other_length():
    with pytest.raises(ValueError, match=r"key_mask must be \(B, T\) = \(1, 5\), got shape \(1, 6\)"):
        redundancy(torch.randn(1, 2, 5, 4), torch.ones(1, 6))


def test_kava_scores_rejects_lam_outside_unit_interval():
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\], got 1.5"):
        kava_scores(torch.rand(1, 2, 3, 3), torch.randn(1, 2, 3, 4), torch.ones(1, 3), torch.ones(1, 3), lam=1.5)


def test_select_slots_rejects_scores_without_a_head_axis():
    with pytest.raises(ValueError, match=r"scores must be \(B, H, T\), got shape \(2, 5\)"):
        select_slots(torch.randn(2, 5), torch.ones(2, 5), 2)


def test_select_slots_rejects_an_empty_budget():
    with pytest.raises(ValueError, match="must be >= 1, got 0"):
        select_slots(torch.randn(1, 2, 5), torch.ones(1, 5), 0)


def test_select_slots_rejects_nan_scores_at_eligible_positions():
    scores = torch.randn(1, 2, 5)
    scores[0, 1, 2] = float("nan")
    select_slots(scores, torch.tensor([[1, 1, 0, 1, 1]]).bool(), 2)  # NaN at an ineligible key is fine
    with pytest.raises(ValueError, match="scores hold NaN or inf at eligible positions"):
        select_slots(scores, torch.ones(1, 5), 2)


@pytest.mark.parametrize("key_mask, num_heads", [(torch.ones(5), 2), (torch.ones(1, 5), 0)])
def test_crop_slots_rejects_a_flat_mask_or_no_heads(key_mask, num_heads):
    with pytest.raises(ValueError, match=r"crop_slots needs key_mask \(B, T\) and num_heads >= 1"):
        crop_slots(key_mask, 2, num_heads)


def test_gather_slots_rejects_positions_of_other_heads():
    with pytest.raises(ValueError, match=r"same B and H, got \(1, 2, 5, 4\) and \(1, 3, 2\)"):
        gather_slots(torch.randn(1, 2, 5, 4), torch.zeros(1, 3, 2, dtype=torch.long))


def test_gather_slots_rejects_positions_past_the_time_axis():
    with pytest.raises(ValueError, match=r"positions must lie in \[0, 5\), got \[0, 5\]"):
        gather_slots(torch.randn(1, 2, 5, 4), torch.tensor([[[0, 5], [1, 2]]]))
