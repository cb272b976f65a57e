import itertools

import pytest
import torch

from kvlib.layers import LayerMap, cka_matrix, layer_map, linear_cka


def test_cka_of_identical_inputs_is_one():
    x = torch.randn(200, 16)
    assert linear_cka(x, x).item() == pytest.approx(1.0, abs=1e-12)


def test_cka_is_invariant_to_orthogonal_transform_and_isotropic_scaling():
    x, y = torch.randn(300, 12), torch.randn(300, 20)
    y = y + x @ torch.randn(12, 20)  # related representations
    q, _ = torch.linalg.qr(torch.randn(20, 20))
    base = linear_cka(x, y)
    torch.testing.assert_close(linear_cka(x, y @ q), base)
    torch.testing.assert_close(linear_cka(3.7 * x, y), base)
    torch.testing.assert_close(linear_cka(x + 5.0, y), base)  # centring removes offsets


def test_cka_compares_different_widths_and_is_symmetric_in_unit_range():
    x = torch.randn(150, 8)
    y = torch.cat([x, torch.randn(150, 24)], dim=1)
    c = linear_cka(x, y)
    torch.testing.assert_close(c, linear_cka(y, x))
    assert 0.0 < c.item() < 1.0


def test_cka_of_independent_inputs_is_small():
    assert linear_cka(torch.randn(2000, 8), torch.randn(2000, 8)).item() < 0.05


def test_cka_matrix_has_ones_where_layers_coincide():
    feats = [torch.randn(100, 6) for _ in range(3)]
    m = cka_matrix(feats, [feats[2], feats[0]])
    assert m.shape == (3, 2)
    torch.testing.assert_close(m[2, 0].item(), 1.0)
    torch.testing.assert_close(m[0, 1].item(), 1.0)


def test_cka_rejects_different_sample_counts():
    with pytest.raises(ValueError, match=r"same n samples, got \(5, 2\) and \(6, 2\)"):
        linear_cka(torch.randn(5, 2), torch.randn(6, 2))


def test_cka_rejects_a_single_sample():
    with pytest.raises(ValueError, match="at least 2 samples, got 1"):
        linear_cka(torch.randn(1, 2), torch.randn(1, 2))


def test_cka_rejects_constant_input():
    with pytest.raises(ValueError, match="constant across samples"):
        linear_cka(torch.ones(5, 2), torch.randn(5, 2))


def test_cka_matrix_rejects_empty_layer_lists():
    with pytest.raises(ValueError, match="at least one layer per side, got 0 and 1"):
        cka_matrix([], [torch.randn(3, 2)])


# layer maps

PAIRS = [(12, 4), (8, 8), (24, 6), (4, 12), (2, 7), (5, 3), (1, 4), (4, 1), (1, 1)]


def random_cka(Lt, Ls):
    return torch.rand(Lt, Ls, generator=torch.Generator().manual_seed(Lt * 31 + Ls))


@pytest.mark.parametrize("kind", ["uniform", "ratio", "cka"])
@pytest.mark.parametrize("Lt, Ls", PAIRS)
def test_layer_maps_are_monotone_weighted_and_cover_both_ends(kind, Lt, Ls):
    m = layer_map(Lt, Ls, kind, cka=random_cka(Lt, Ls) if kind == "cka" else None)
    assert m.num_student_layers == Ls and m.num_teacher_layers == Lt
    for src, w in zip(m.sources, m.weights):
        assert all(0 <= j < Lt for j in src) and all(x > 0 for x in w)
        assert sum(w) == pytest.approx(1.0)
    lows = [min(src) for src in m.sources]
    highs = [max(src) for src in m.sources]
    assert lows == sorted(lows) and highs == sorted(highs)
    if Ls >= 2:
        assert 0 in m.sources[0] and Lt - 1 in m.sources[-1]
    mat = m.matrix()
    torch.testing.assert_close(mat.sum(1), torch.ones(Ls))


def test_uniform_map_interpolates_between_teacher_layers():
    m = layer_map(3, 5, "uniform")
    assert m.sources == ((0,), (0, 1), (1,), (1, 2), (2,))
    assert m.weights[1] == pytest.approx((0.5, 0.5))


def test_ratio_map_averages_blocks_of_teacher_layers():
    m = layer_map(6, 2, "ratio")
    assert m.sources == ((0, 1, 2), (3, 4, 5))
    assert m.weights[0] == pytest.approx((1 / 3,) * 3)


def test_cka_map_follows_a_planted_correspondence():
    cka = torch.full((6, 3), 0.1)
    cka[0, 0], cka[3, 1], cka[5, 2] = 0.9, 0.9, 0.9
    assert layer_map(6, 3, "cka", cka=cka).sources == ((0,), (3,), (5,))


@pytest.mark.parametrize("Lt, Ls", [(4, 3), (3, 5), (5, 5)])
def test_cka_map_matches_brute_force_over_monotone_assignments(Lt, Ls):
    cka = random_cka(Lt, Ls)
    best = max(
        (a for a in itertools.combinations_with_replacement(range(Lt), Ls) if a[0] == 0 and a[-1] == Lt - 1),
        key=lambda a: sum(cka[j, i].item() for i, j in enumerate(a)),
    )
    assert tuple(s[0] for s in layer_map(Lt, Ls, "cka", cka=cka).sources) == best


def test_layer_map_serialises_to_plain_dict():
    m = layer_map(4, 2, "ratio")
    d = m.to_dict()
    assert LayerMap(d["num_teacher_layers"], tuple(map(tuple, d["sources"])), tuple(map(tuple, d["weights"]))) == m


def test_layer_map_rejects_unknown_kind():
    with pytest.raises(ValueError, match="kind must be one of"):
        layer_map(4, 2, "greedy")


def test_layer_map_rejects_empty_models():
    with pytest.raises(ValueError, match="layer counts must be >= 1, got teacher 0 and student 2"):
        layer_map(0, 2)


def test_layer_map_requires_cka_for_cka_kind():
    with pytest.raises(ValueError, match="a cka matrix is required by kind='cka'"):
        layer_map(4, 2, "cka")


def test_layer_map_rejects_cka_for_other_kinds():
    with pytest.raises(ValueError, match="used by no other kind; got kind='uniform'"):
        layer_map(4, 2, "uniform", cka=torch.rand(4, 2))


def test_layer_map_rejects_cka_of_wrong_shape():
    with pytest.raises(ValueError, match=r"cka has shape \(2, 4\) .* expected \(4, 2\)"):
        layer_map(4, 2, "cka", cka=torch.rand(2, 4))


def test_layer_map_rejects_nan_cka():
    cka = torch.rand(4, 2)
    cka[1, 1] = float("nan")
    with pytest.raises(ValueError, match="cka holds NaN or inf"):
        layer_map(4, 2, "cka", cka=cka)
