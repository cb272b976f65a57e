"""Sparse time alignment (issue 12, item 1): ``time_taps`` and the gathering ``TeacherAligner`` against the
dense reference, ``time_alignment`` and the ``(B, Ht, Ts, Tt)`` einsum the aligner used before, on every
kind, padding, examples of different lengths, segment bounds, compressed keep masks and the shuffled control.

Tolerance of the aligner comparison. Each aligned value is ``y = sum_l L[s, l] sum_j a_j x[l, j]`` with convex
weights (the layer map's rows and each renormalised time row sum to 1), so ``|y| <= max|x|``. In float32 (unit
roundoff u = eps / 2) each side makes: the mass, a sum of <= k terms, relative error <= (k - 1) u, and the
division u, so each weight is off by <= k u relative; the k-term dot product adds <= k u sum|a_j x_j|; the
Lt-term layer mix <= Lt u max|x|; the span weights themselves are float32 roundings of float64 values summed
in another order (<= 1 ulp, u). Per side <= (2k + Lt + 1) u max|x| (the dense side's extra terms are exact
zeros), so the two differ by at most ``(2k + Lt + 1) eps max|x|``, ~2e-6 max|x| for k = 4, Lt = 3.
"""

import pytest
import torch

from kvlib.config import ModelShape
from kvlib.data import SEGMENTS, generate
from kvlib.distill import TeacherAligner, shuffle_time
from kvlib.hf import KVSpec
from kvlib.layers import layer_map
from kvlib.resample import time_alignment, time_taps
from kvlib.teacher_kv import extract_store
from kvlib.text import encode_batch, train_tokenizer

EPS = torch.finfo(torch.float32).eps
KINDS = ("global", "segment", "span", "causal_span")


def dense_from_taps(index, weight, Tt):
    """(B, Ts, k) taps -> the (B, Ts, Tt) matrix they stand for."""
    B, Ts, _ = index.shape
    return torch.zeros(B, Ts, Tt).scatter_add_(2, index, weight)  # (B, Ts, Tt)


def tiling(n, max_piece, gen):
    """Offsets (T, 2) of <bos> (0, 0), pieces of 0..max_piece characters tiling [0, n) (empty ones included,
    as byte pieces of one character get), and <eos> (n, n)."""
    cuts, at = [0], 0
    while at < n:
        at = min(n, at + int(torch.randint(0, max_piece + 1, (), generator=gen)))
        cuts.append(at)
    spans = [(0, 0)] + list(zip(cuts[:-1], cuts[1:])) + [(n, n)]
    return torch.tensor(spans)  # (T, 2)


def pad(rows, T):
    """Right-pad a list of (T_i, ...) tensors with zeros to (B, T, ...), with the (B, T) mask of real rows."""
    out = torch.zeros(len(rows), T, *rows[0].shape[1:], dtype=rows[0].dtype)
    for b, r in enumerate(rows):
        out[b, : len(r)] = r
    return out, torch.arange(T)[None] < torch.tensor([len(r) for r in rows])[:, None]


def random_batch(seed, B=3, extra_t=2, extra_s=1):
    """Masks, offsets and segment bounds of one right-padded batch: each example's text tiled by a finer
    teacher and a coarser student tokenisation, with a few steps of padding beyond the longest example, and
    3 segments per example (every segment non-empty for the teacher, possibly empty for the student)."""
    gen = torch.Generator().manual_seed(seed)
    chars = [int(n) for n in torch.randint(1, 20, (B,), generator=gen)]
    off_t = [tiling(n, 3, gen) for n in chars]
    off_s = [tiling(n, 6, gen) for n in chars]
    Tt, Ts = max(map(len, off_t)) + extra_t, max(map(len, off_s)) + extra_s
    offsets_t, mask_t = pad(off_t, Tt)
    offsets_s, mask_s = pad(off_s, Ts)

    def cuts(n, lowest):  # 3 segments of lengths >= lowest summing to n (n >= 3 * lowest)
        inner = torch.randint(0, n - 3 * lowest + 1, (2,), generator=gen).sort().values + torch.tensor([1, 2]) * lowest
        return torch.tensor([0, *inner.tolist(), n])

    bounds_t = torch.stack([cuts(len(o), 1) for o in off_t])  # (B, 4)
    bounds_s = torch.stack([cuts(len(o), 0) for o in off_s])
    return dict(
        mask_t=mask_t, mask_s=mask_s, offsets_t=offsets_t, offsets_s=offsets_s, bounds_t=bounds_t, bounds_s=bounds_s
    )


def call(fn, kind, b):
    return fn(kind, b["mask_t"], b["mask_s"], b["offsets_t"], b["offsets_s"], b["bounds_t"], b["bounds_s"])


# time_taps against time_alignment


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("seed", range(20))
def test_taps_stand_for_the_dense_alignment_of_every_kind(kind, seed):
    b = random_batch(seed)
    index, weight = call(time_taps, kind, b)
    dense = call(time_alignment, kind, b)
    assert index.shape == weight.shape and index.shape[:2] == b["mask_s"].shape
    assert index.dtype == torch.long and (index >= 0).all() and (index < b["mask_t"].shape[1]).all()
    assert (weight[~b["mask_s"]] == 0).all()
    if kind in ("span", "causal_span"):  # float64 weights summed in another order, rounded to float32: <= 1 ulp of 1
        torch.testing.assert_close(dense_from_taps(index, weight, dense.shape[2]), dense, rtol=0, atol=EPS)
    else:  # the same float32 operations on the same two neighbours
        assert torch.equal(dense_from_taps(index, weight, dense.shape[2]), dense)


def test_linear_kinds_take_two_taps_and_span_the_largest_overlap_count():
    words = torch.tensor([[[0, 5], [5, 6], [6, 11]]])  # "hello", " ", "world"
    chars = torch.tensor([[[i, i + 1] for i in range(11)]])
    m3, m11 = torch.ones(1, 3, dtype=torch.bool), torch.ones(1, 11, dtype=torch.bool)
    assert time_taps("span", m3, m11, words, chars)[0].shape == (1, 11, 1)  # each character in one word
    index, weight = time_taps("span", m11, m3, chars, words)  # each word reads its characters
    assert index.shape == (1, 3, 5) and index[0, 0].tolist() == [0, 1, 2, 3, 4]
    torch.testing.assert_close(weight[0, 0], torch.full((5,), 0.2))
    assert weight[0, 1].tolist() == [1.0, 0, 0, 0, 0]
    assert time_taps("global", m11, m3)[0].shape == (1, 3, 2)


def test_a_token_without_overlap_taps_the_nearest_teacher_token_and_ties_go_to_the_first():
    teacher = torch.tensor([[[0, 4], [5, 9], [10, 14], [14, 15], [15, 16]]])
    student = torch.tensor([[[0, 0], [4, 5], [11, 12], [15, 15]]])  # <bos>, the gap " ", inside, a tie
    mask_t, mask_s = torch.ones(1, 5, dtype=torch.bool), torch.ones(1, 4, dtype=torch.bool)
    index, weight = time_taps("span", mask_t, mask_s, teacher, student)
    assert index[0, :, 0].tolist() == [0, 0, 2, 3] and weight[0, :, 0].tolist() == [1.0, 1.0, 1.0, 1.0]
    torch.testing.assert_close(
        dense_from_taps(index, weight, 5), time_alignment("span", mask_t, mask_s, teacher, student)
    )


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    "lengths_t, Tt, lengths_s, Ts",
    [([3, 2], 3, [0, 0], 0), ([0, 0], 0, [0, 0], 0), ([0, 0], 0, [0, 0], 2), ([3, 0], 3, [2, 0], 2)],
)
def test_taps_of_empty_sequences_stand_for_the_dense_alignment(kind, lengths_t, Tt, lengths_s, Ts):
    from test_resample import alignment_inputs

    mask_t, mask_s, kwargs = alignment_inputs(kind, lengths_t, Tt, lengths_s, Ts)
    index, weight = time_taps(kind, mask_t, mask_s, **kwargs)
    assert index.shape[:2] == (2, Ts) and (Tt > 0 or index.shape[2] == 0)
    assert torch.equal(dense_from_taps(index, weight, Tt), time_alignment(kind, mask_t, mask_s, **kwargs))


@pytest.mark.parametrize(
    "kind, kwargs, match",
    [
        ("dtw", {}, "time alignment must be one of"),
        ("span", {}, "'span' needs offsets_t and offsets_s"),
        ("segment", {}, "'segment' needs bounds_t and bounds_s"),
        ("segment", {"bounds_t": [0, 3, 7], "bounds_s": [0, 1, 2]}, r"bounds_t reach \[7\] but the teacher has only 4"),
        ("segment", {"bounds_t": [0, 2, 4], "bounds_s": [0, 4]}, r"must both be \(1 or B=1, S \+ 1\) with the same"),
        ("segment", {"bounds_t": [0, 4, 4], "bounds_s": [0, 2, 4]}, "segment 1 of example 0 has student tokens but no"),
    ],
)
def test_taps_refuse_what_the_dense_alignment_refuses(kind, kwargs, match):
    mask = torch.ones(1, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match=match):
        time_taps(kind, mask, mask, **kwargs)
    with pytest.raises(ValueError, match=match):
        time_alignment(kind, mask, mask, **kwargs)


def test_span_taps_refuse_teacher_offsets_that_go_back():
    teacher = torch.tensor([[[0, 2], [2, 4], [1, 3]]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="starts and ends never decrease.*example 0.*encode_batch"):
        time_taps("span", mask, mask, teacher, teacher)


# TeacherAligner against the dense einsum


def dense_aligner(aligner, teacher, student, perturb=0.0):
    """The aligner's forward as it was: a (B, Ht, Ts, Tt) matrix renormalised over kept slots and one einsum;
    ``perturb`` adds that much to the first weight of the first row that mixes several teacher steps (a row of
    one step would be renormalised back)."""
    kv_t, keep = teacher["kv"], teacher["mask"]
    A = time_alignment(
        aligner.time_align,
        teacher["attention_mask"].bool(),
        student["attention_mask"].bool(),
        teacher["offsets"],
        student["offsets"],
        teacher["segment_bounds"],
        student["segment_bounds"],
    )  # (B, Ts, Tt)
    if perturb:
        b, i = ((A > 0).sum(-1) > 1).nonzero()[0].tolist()
        A[b, i, A[b, i].nonzero()[0, 0]] += perturb
    if aligner.shuffle_time:
        kv_t, keep = shuffle_time(kv_t, keep, teacher["attention_mask"].bool())
    A = A[:, None] * keep.float()[:, :, None, :]  # (B, Ht, Ts, Tt)
    mass = A.sum(-1)  # (B, Ht, Ts)
    A = A / mass.clamp(min=1e-12)[..., None]
    keys = torch.stack([k for k, _ in kv_t]).float()  # (Lt, B, Ht, Tt, Dt)
    values = torch.stack([v for _, v in kv_t]).float()
    keys = torch.einsum("sl,lbhtd,bhxt->sbhxd", aligner.layer_weights, keys, A)  # (Ls, B, Ht, Ts, Dt)
    values = torch.einsum("sl,lbhtd,bhxt->sbhxd", aligner.layer_weights, values, A)
    targets = [proj(k, v) for proj, k, v in zip(aligner.projectors, keys, values)]
    covered = student["attention_mask"].bool() & (mass > 0).all(1)
    return targets, list(zip(keys, values)), covered


def tolerance(k, Lt, x):
    """The bound of the module docstring: (2k + Lt + 1) eps max|x|."""
    return (2 * k + Lt + 1) * EPS * x.abs().max().item()


def random_teacher(b, Lt, Ht, D, compressed, gen):
    """A store-like teacher batch on b's masks: KV zero where a head holds nothing; a compressed store keeps a
    random half of each head's real slots."""
    mask_t = b["mask_t"]
    keep = mask_t[:, None].expand(-1, Ht, -1)  # (B, Ht, Tt)
    if compressed:
        keep = keep & (torch.rand(keep.shape, generator=gen) < 0.5)
    kv = [
        tuple(torch.randn(*keep.shape, D, generator=gen).masked_fill(~keep[..., None], 0) for _ in "kv")
        for _ in range(Lt)
    ]
    teacher = dict(kv=kv, mask=keep, attention_mask=mask_t.long(), offsets=b["offsets_t"])
    student = dict(attention_mask=b["mask_s"].long(), offsets=b["offsets_s"], segment_bounds=b["bounds_s"])
    return teacher | {"segment_bounds": b["bounds_t"]}, student


def assert_aligners_agree(sparse, dense, k, Lt, kv_t):
    (targets, unprojected, covered), (targets_d, unprojected_d, covered_d) = sparse, dense
    atol = tolerance(k, Lt, torch.stack([x for pair in kv_t for x in pair]))
    assert torch.equal(covered, covered_d)
    for (ks, vs), (kd, vd) in zip(unprojected, unprojected_d):
        torch.testing.assert_close(ks, kd, rtol=0, atol=atol)
        torch.testing.assert_close(vs, vd, rtol=0, atol=atol)
    for (ks, vs), (kd, vd) in zip(targets, targets_d):  # a fresh projector of matching shapes is the identity
        torch.testing.assert_close(ks, kd, rtol=0, atol=atol)
        torch.testing.assert_close(vs, vd, rtol=0, atol=atol)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("compressed", [False, True])
@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("seed", range(4))
def test_sparse_aligner_matches_the_dense_einsum(kind, compressed, shuffle, seed):
    Lt, Ls, H, D = 3, 2, 2, 8
    b = random_batch(seed)
    gen = torch.Generator().manual_seed(100 + seed)
    teacher, student = random_teacher(b, Lt, H, D, compressed, gen)
    spec_t, spec_s = KVSpec(Lt, H, D), KVSpec(Ls, H, D)
    aligner = TeacherAligner(spec_t, spec_s, layer_map(Lt, Ls), "linear", kind, shuffle)
    torch.manual_seed(seed)  # the same shuffle on both sides
    sparse = aligner(teacher, student)
    torch.manual_seed(seed)
    dense = dense_aligner(aligner, teacher, student)
    k = call(time_taps, kind, b)[0].shape[2]
    assert_aligners_agree(sparse, dense, k, Lt, teacher["kv"])
    if compressed:  # a student step whose taps all fall on dropped slots is not covered
        assert not torch.equal(sparse[2], b["mask_s"])


def test_the_tolerance_fails_on_one_perturbed_weight():
    Lt, H, D = 3, 2, 8
    b = random_batch(0)
    teacher, student = random_teacher(b, Lt, H, D, False, torch.Generator().manual_seed(0))
    aligner = TeacherAligner(KVSpec(Lt, H, D), KVSpec(2, H, D), layer_map(Lt, 2), "linear", "span")
    k = call(time_taps, "span", b)[0].shape[2]
    sparse, dense = aligner(teacher, student), dense_aligner(aligner, teacher, student, perturb=1e-3)
    with pytest.raises(AssertionError, match="Tensor-likes are not close"):
        assert_aligners_agree(sparse, dense, k, Lt, teacher["kv"])


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    examples = generate(8, seed=0, max_operand=9)
    tok_t = train_tokenizer("char", [e.text for e in examples])
    tok_s = train_tokenizer("bpe", [e.text for e in examples], vocab_size=300)
    teacher = ModelShape("qwen2", 3, 4, 2, 16, 64).build(len(tok_t), seed=1)
    made = {
        budget: extract_store(teacher, tok_t, examples, tmp_path_factory.mktemp("store"), budget=budget, progress=False)
        for budget in (None, 6)
    }
    spans = [{s: e.spans[s] for s in SEGMENTS} for e in examples]
    return made, encode_batch(tok_s, [e.text for e in examples[:4]], spans[:4])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("budget", [None, 6])
@pytest.mark.parametrize("shuffle", [False, True])
def test_sparse_aligner_matches_the_dense_einsum_on_real_stores(stores, kind, budget, shuffle):
    made, student = stores
    store = made[budget]
    teacher = store.batch(range(4))
    spec_s = KVSpec(2, store.spec.num_kv_heads, store.spec.head_dim)
    aligner = TeacherAligner(store.spec, spec_s, layer_map(store.spec.num_layers, 2), "linear", kind, shuffle)
    torch.manual_seed(1)
    sparse = aligner(teacher, student)
    torch.manual_seed(1)
    dense = dense_aligner(aligner, teacher, student)
    mask_t, mask_s = teacher["attention_mask"].bool(), student["attention_mask"].bool()
    args = teacher["offsets"], student["offsets"], teacher["segment_bounds"], student["segment_bounds"]
    k = time_taps(kind, mask_t, mask_s, *args)[0].shape[2]
    assert_aligners_agree(sparse, dense, k, store.spec.num_layers, teacher["kv"])
