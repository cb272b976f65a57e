import pytest
import torch

from kvlib.resample import area_weights, resample_time, segment_resample, span_alignment, time_alignment


def ramp(t, d=3):
    """(t, d) rows that grow linearly in time: row i is i * (1, 2, ..., d)."""
    return torch.arange(t, dtype=torch.float32)[:, None] * torch.arange(1, d + 1, dtype=torch.float32)


@pytest.mark.parametrize("mode", ["linear", "nearest"])
def test_resample_to_same_length_is_identity(mode):
    x = torch.randn(2, 3, 7, 5)
    assert torch.equal(resample_time(x, 7, mode), x)


@pytest.mark.parametrize("t_in, t_out", [(5, 9), (9, 5), (2, 17), (17, 2), (6, 6)])
def test_linear_resampling_is_exact_on_a_ramp(t_in, t_out):
    y = resample_time(ramp(t_in), t_out, "linear")
    pos = torch.linspace(0, t_in - 1, t_out)
    torch.testing.assert_close(y, pos[:, None] * torch.arange(1, 4.0))


def test_linear_upsampling_interpolates_between_neighbours():
    x = torch.tensor([[0.0], [10.0]])
    assert resample_time(x, 5, "linear").flatten().tolist() == [0.0, 2.5, 5.0, 7.5, 10.0]


def test_nearest_picks_input_rows_and_keeps_the_ends():
    x = torch.randn(7, 4)
    y = resample_time(x, 4, "nearest")
    assert torch.equal(y[0], x[0]) and torch.equal(y[-1], x[-1])
    assert all(any(torch.equal(row, r) for r in x) for row in y)


def test_downsampling_keeps_first_and_last_step():
    x = torch.randn(2, 2, 13, 4)
    y = resample_time(x, 4)
    assert torch.equal(y[..., 0, :], x[..., 0, :]) and torch.equal(y[..., -1, :], x[..., -1, :])


def test_empty_input_gives_zeros_and_zero_length_gives_empty():
    assert torch.equal(resample_time(torch.randn(2, 0, 4), 3), torch.zeros(2, 3, 4))
    assert resample_time(torch.randn(2, 5, 4), 0).shape == (2, 0, 4)


def test_single_step_input_is_repeated():
    x = torch.randn(3, 1, 4)
    for mode in ("linear", "nearest"):
        assert torch.equal(resample_time(x, 6, mode), x.expand(3, 6, 4))


def test_single_output_step_sits_in_the_middle():
    assert resample_time(ramp(5, 1), 1).item() == 2.0


def test_resampling_passes_gradients():
    x = torch.randn(2, 5, 3, requires_grad=True)
    resample_time(x, 8).sum().backward()
    torch.testing.assert_close(x.grad.sum(), torch.tensor(2 * 8 * 3.0))


def test_resample_rejects_unknown_mode():
    with pytest.raises(ValueError, match="mode must be one of"):
        resample_time(torch.randn(3, 2), 4, "cubic")


def test_resample_rejects_negative_length():
    with pytest.raises(ValueError, match="t_out must be >= 0, got -1"):
        resample_time(torch.randn(3, 2), -1)


def test_resample_rejects_1d_input():
    with pytest.raises(ValueError, match=r"x must be \(..., T, D\)"):
        resample_time(torch.randn(3), 4)


# segment_resample


def test_segments_are_resampled_separately():
    x = torch.randn(2, 10, 4)
    y, mask = segment_resample(x, [0, 3, 8, 10], [0, 5, 6, 12])
    expected = torch.cat(
        [resample_time(x[:, 0:3], 5), resample_time(x[:, 3:8], 1), resample_time(x[:, 8:10], 6)], dim=1
    )
    torch.testing.assert_close(y, expected)
    assert mask.all() and mask.shape == (12,)


def test_per_example_bounds_match_a_loop_over_examples():
    x = torch.randn(3, 2, 9, 4)
    b_in = torch.tensor([[0, 2, 7, 9], [0, 4, 5, 8], [0, 1, 1, 6]])
    b_out = torch.tensor([[0, 4, 9, 11], [0, 3, 4, 5], [0, 2, 6, 9]])
    for mode in ("linear", "nearest"):
        y, mask = segment_resample(x, b_in, b_out, mode)
        assert y.shape == (3, 2, 11, 4) and mask.shape == (3, 11)
        for b in range(3):
            y_b, _ = segment_resample(x[b], b_in[b], b_out[b], mode)
            n = int(b_out[b, -1])
            torch.testing.assert_close(y[b, :, :n], y_b)
            assert mask[b, :n].all() and not mask[b, n:].any()
            assert (y[b, :, n:] == 0).all()


def test_empty_input_segment_gives_zeros():
    x = torch.randn(6, 2)
    y, _ = segment_resample(x, [0, 3, 3, 6], [0, 2, 4, 6])
    assert (y[2:4] == 0).all()
    torch.testing.assert_close(y[4:6], resample_time(x[3:6], 2))


def test_segment_resample_rejects_different_segment_counts():
    with pytest.raises(ValueError, match="bounds_in has 2 segments but bounds_out has 3"):
        segment_resample(torch.randn(5, 2), [0, 2, 5], [0, 1, 2, 3])


def test_segment_resample_rejects_bounds_not_starting_at_zero():
    with pytest.raises(ValueError, match="bounds_in must start at 0 and never decrease"):
        segment_resample(torch.randn(5, 2), [1, 2, 5], [0, 1, 3])


def test_segment_resample_rejects_decreasing_bounds():
    with pytest.raises(ValueError, match="bounds_out must start at 0 and never decrease"):
        segment_resample(torch.randn(5, 2), [0, 2, 5], [0, 3, 1])


def test_segment_resample_rejects_bounds_past_the_input():
    with pytest.raises(ValueError, match="bounds_in reach \\[7\\] but x has only 5 time steps"):
        segment_resample(torch.randn(5, 2), [0, 2, 7], [0, 1, 3])


def test_segment_resample_rejects_malformed_bounds():
    with pytest.raises(ValueError, match=r"bounds_out must be cut points"):
        segment_resample(torch.randn(5, 2), [0, 5], [3])


def test_segment_resample_rejects_batch_mismatch():
    with pytest.raises(ValueError, match="per-example bounds for 3 examples"):
        segment_resample(torch.randn(2, 5, 2), [[0, 5]] * 3, [[0, 4]] * 3)


# span_alignment


def offsets(spans):
    return torch.tensor(spans)[None]  # (1, T, 2)


def test_identical_tokenizations_align_to_identity():
    off = offsets([[0, 3], [3, 4], [4, 9]])
    assert torch.equal(span_alignment(off, off), torch.eye(3)[None])


def test_characters_spread_over_the_words_they_belong_to():
    words = offsets([[0, 5], [5, 6], [6, 11]])  # "hello", " ", "world"
    chars = offsets([[i, i + 1] for i in range(11)])
    a = span_alignment(words, chars)  # student = characters
    assert a.shape == (1, 11, 3)
    assert torch.equal(a[0].argmax(1), torch.tensor([0] * 5 + [1] + [2] * 5))
    b = span_alignment(chars, words)  # student = words: each averages its characters
    torch.testing.assert_close(b[0, 0, :5], torch.full((5,), 0.2))
    torch.testing.assert_close(b.sum(2), torch.ones(1, 3))


def test_token_without_overlap_takes_the_nearest_teacher_token():
    teacher = offsets([[0, 4], [5, 9], [10, 14]])
    student = offsets([[0, 0], [4, 5], [11, 12]])  # a BOS with an empty span, then the gap " "
    a = span_alignment(teacher, student)
    assert a[0, 0].tolist() == [1.0, 0.0, 0.0]
    assert a[0, 1].sum().item() == pytest.approx(1.0)
    assert a[0, 2].tolist() == [0.0, 0.0, 1.0]


def test_padding_rows_and_columns_are_zero_and_real_rows_sum_to_one():
    teacher = torch.tensor([[[0, 2], [2, 4], [0, 0]], [[0, 3], [3, 6], [6, 8]]])
    student = torch.tensor([[[0, 1], [1, 4], [0, 0], [0, 0]], [[0, 4], [4, 8], [0, 0], [0, 0]]])
    mask_t = torch.tensor([[1, 1, 0], [1, 1, 1]])
    mask_s = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0]])
    a = span_alignment(teacher, student, mask_t, mask_s)
    assert (a[0, :, 2] == 0).all()
    assert (a[:, 2:] == 0).all()
    torch.testing.assert_close(a[:, :2].sum(2), torch.ones(2, 2))


def test_causal_span_drops_teacher_tokens_that_end_after_the_student_token():
    teacher = offsets([[0, 0], [0, 1], [1, 4], [4, 6]])  # <bos>, "a", "bcd", "ef"
    student = offsets([[0, 0], [0, 3], [3, 6]])  # <bos>, "abc", "def"
    span = span_alignment(teacher, student)
    causal = span_alignment(teacher, student, causal=True)
    assert span[0, 1].tolist() == pytest.approx([0, 1 / 3, 2 / 3, 0])  # "abc" overlaps "a" and "bc" of "bcd"
    assert causal[0, 1].tolist() == [0, 1, 0, 0]  # "bcd" ends after "abc": only "a" has been read
    assert causal[0, 2].tolist() == pytest.approx([0, 0, 1 / 3, 2 / 3])  # "bcd" and "ef" both end by 6
    assert causal[0, 0].tolist() == [1, 0, 0, 0]  # <bos> reads <bos>


def test_causal_span_falls_back_to_the_last_teacher_token_that_ended():
    teacher = offsets([[0, 0], [0, 5], [5, 9]])  # <bos>, "hello", " wor"
    student = offsets([[0, 2], [2, 5], [5, 7]])  # "he", "llo", " w"
    a = span_alignment(teacher, student, causal=True)
    assert a[0].tolist() == [[1, 0, 0], [0, 1, 0], [0, 1, 0]]  # "he" only after <bos>; " w" after "hello"
    no_bos = span_alignment(offsets([[0, 5], [5, 9]]), offsets([[0, 2]]), causal=True)
    assert no_bos[0].tolist() == [[1, 0]]  # nothing ended by 2: the first teacher token (documented fallback)


def test_causal_span_never_weights_a_teacher_token_ending_after_the_student_token():
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):

        def tiles(n):
            cuts = torch.sort(torch.randperm(n - 1, generator=gen)[: n // 3] + 1).values.tolist()
            edges = [0, *cuts, n]
            return offsets([[0, 0]] + [list(p) for p in zip(edges[:-1], edges[1:])])

        teacher, student = tiles(30), tiles(30)
        a = span_alignment(teacher, student, causal=True)[0]  # (Ts, Tt)
        late = teacher[0, None, :, 1] > student[0, :, None, 1]  # (Ts, Tt)
        assert (a[late] == 0).all()
        torch.testing.assert_close(a.sum(1), torch.ones(a.shape[0]))


def test_span_alignment_rejects_malformed_offsets():
    with pytest.raises(ValueError, match=r"offsets must be \(B, T, 2\)"):
        span_alignment(torch.zeros(1, 3, 3), torch.zeros(1, 3, 2))


def test_span_alignment_rejects_batch_mismatch():
    with pytest.raises(ValueError, match="teacher batch 2 != student batch 1"):
        span_alignment(torch.zeros(2, 3, 2), torch.zeros(1, 3, 2))


def test_span_alignment_rejects_mask_of_other_shape():
    with pytest.raises(ValueError, match="masks must match the offsets"):
        span_alignment(torch.zeros(1, 3, 2), torch.zeros(1, 3, 2), mask_t=torch.ones(1, 4))


def test_span_alignment_rejects_example_without_teacher_tokens():
    with pytest.raises(ValueError, match=r"examples \[0\] have student tokens but no teacher token"):
        span_alignment(torch.zeros(1, 3, 2), torch.zeros(1, 3, 2), mask_t=torch.zeros(1, 3))


# area_weights


@pytest.mark.parametrize("n_in, n_out", [(12, 2), (28, 4), (32, 8), (8, 32), (7, 3), (1, 4), (5, 5)])
def test_area_weights_are_row_stochastic_and_cover_every_input(n_in, n_out):
    w = area_weights(n_in, n_out)
    assert w.shape == (n_out, n_in) and (w >= 0).all()
    torch.testing.assert_close(w.sum(1), torch.ones(n_out))
    torch.testing.assert_close(w.sum(0), torch.full((n_in,), n_out / n_in))


def test_area_weights_group_copy_and_identity():
    torch.testing.assert_close(area_weights(8, 2), torch.repeat_interleave(torch.eye(2), 4, dim=1) / 4)
    torch.testing.assert_close(area_weights(2, 8), torch.repeat_interleave(torch.eye(2), 4, dim=0))
    assert torch.equal(area_weights(5, 5), torch.eye(5))


def test_area_weights_reject_empty_axes():
    with pytest.raises(ValueError, match="n_in >= 1 and n_out >= 1, got n_in=0, n_out=3"):
        area_weights(0, 3)


# time_alignment


def right_mask(lengths, T):
    return torch.arange(T)[None] < torch.tensor(lengths)[:, None]


def test_global_alignment_matrix_equals_resampling_each_example():
    x = torch.randn(2, 3, 9, 4)
    mask_t, mask_s = right_mask([9, 6], 9), right_mask([5, 7], 7)
    a = time_alignment("global", mask_t, mask_s)
    y = torch.einsum("bst,bhtd->bhsd", a, x)
    torch.testing.assert_close(y[0, :, :5], resample_time(x[0], 5))
    torch.testing.assert_close(y[1, :, :7], resample_time(x[1, :, :6], 7))
    assert (y[0, :, 5:] == 0).all()


def test_segment_alignment_matrix_equals_segment_resample():
    x = torch.randn(2, 2, 8, 4)
    b_t = torch.tensor([[0, 3, 7, 8], [0, 2, 4, 6]])
    b_s = torch.tensor([[0, 2, 5, 6], [0, 3, 4, 5]])
    a = time_alignment("segment", right_mask([8, 6], 8), right_mask([6, 5], 6), bounds_t=b_t, bounds_s=b_s)
    expected, _ = segment_resample(x, b_t, b_s)
    torch.testing.assert_close(torch.einsum("bst,bhtd->bhsd", a, x), expected)


def test_span_alignment_kind_uses_offsets():
    off_t = torch.tensor([[[0, 2], [2, 4]]])
    off_s = torch.tensor([[[0, 1], [1, 2], [2, 4]]])
    a = time_alignment("span", right_mask([2], 2), right_mask([3], 3), off_t, off_s)
    assert a[0].argmax(1).tolist() == [0, 0, 1]


def test_time_alignment_rejects_unknown_kind():
    with pytest.raises(ValueError, match="time alignment must be one of"):
        time_alignment("dtw", right_mask([2], 2), right_mask([2], 2))


def test_time_alignment_rejects_left_padding():
    with pytest.raises(ValueError, match="mask_s must be a right-padded"):
        time_alignment("global", right_mask([2], 2), torch.tensor([[0, 1]]))


def test_time_alignment_needs_offsets_for_span():
    with pytest.raises(ValueError, match="'span' needs offsets_t and offsets_s"):
        time_alignment("span", right_mask([2], 2), right_mask([2], 2))


def test_time_alignment_needs_bounds_for_segment():
    with pytest.raises(ValueError, match="'segment' needs bounds_t and bounds_s"):
        time_alignment("segment", right_mask([2], 2), right_mask([2], 2))


# Empty sequences (T = 0)


def alignment_inputs(kind: str, lengths_t: list[int], Tt: int, lengths_s: list[int], Ts: int):
    """Right-padded masks of these real lengths and, per kind, offsets (token i covers character i) or one
    segment per example covering its real tokens."""
    mask_t, mask_s = right_mask(lengths_t, Tt), right_mask(lengths_s, Ts)
    if kind in ("span", "causal_span"):
        offsets = [
            torch.stack([torch.arange(m.shape[1]), torch.arange(m.shape[1]) + 1], -1) * m[..., None]
            for m in (mask_t, mask_s)
        ]
        return mask_t, mask_s, {"offsets_t": offsets[0], "offsets_s": offsets[1]}
    if kind == "segment":
        bounds = [torch.tensor([[0, n] for n in lengths]) for lengths in (lengths_t, lengths_s)]
        return mask_t, mask_s, {"bounds_t": bounds[0], "bounds_s": bounds[1]}
    return mask_t, mask_s, {}


@pytest.mark.parametrize("kind", ["global", "segment", "span", "causal_span"])
@pytest.mark.parametrize(
    "lengths_t, Tt, lengths_s, Ts",
    [
        ([3, 2], 3, [0, 0], 0),  # no student step
        ([0, 0], 0, [0, 0], 0),  # no step at all
        ([0, 0], 0, [0, 0], 2),  # no teacher step, student padding only
        ([3, 0], 3, [2, 0], 2),  # example 1 is padding on both sides
    ],
)
def test_time_alignment_of_empty_sequences_has_zero_rows_for_padding_and_stochastic_rows_elsewhere(
    kind, lengths_t, Tt, lengths_s, Ts
):
    mask_t, mask_s, kwargs = alignment_inputs(kind, lengths_t, Tt, lengths_s, Ts)
    a = time_alignment(kind, mask_t, mask_s, **kwargs)
    assert a.shape == (2, Ts, Tt)
    torch.testing.assert_close(a.sum(-1), mask_s.float())  # float32 sums of <= 3 weights: a few ulp


@pytest.mark.parametrize("kind", ["global", "segment", "span"])
@pytest.mark.parametrize("lengths_t, Tt, lonely", [([3, 0], 3, r"\[1\]"), ([0, 0], 0, r"\[0, 1\]")])
def test_time_alignment_refuses_examples_with_student_tokens_but_no_teacher_token(kind, lengths_t, Tt, lonely):
    mask_t, mask_s, kwargs = alignment_inputs(kind, lengths_t, Tt, [2, 2], 2)
    with pytest.raises(ValueError, match=rf"examples {lonely} have student tokens but no teacher token"):
        time_alignment(kind, mask_t, mask_s, **kwargs)


def test_segment_alignment_refuses_a_segment_with_student_tokens_but_no_teacher_token():
    b_t, b_s = torch.tensor([[0, 3, 3, 4]]), torch.tensor([[0, 2, 3, 4]])
    with pytest.raises(ValueError, match=r"segment 1 of example 0 has student tokens but no teacher token"):
        time_alignment("segment", right_mask([4], 4), right_mask([4], 4), bounds_t=b_t, bounds_s=b_s)


def test_segment_resample_of_an_empty_input_gives_zeros_and_onto_no_step_an_empty_tensor():
    y, mask = segment_resample(torch.randn(2, 0, 4), [[0, 0, 0], [0, 0, 0]], [[0, 1, 3], [0, 2, 2]])
    assert torch.equal(y, torch.zeros(2, 3, 4)) and mask.tolist() == [[True] * 3, [True, True, False]]
    y, mask = segment_resample(torch.randn(2, 5, 4), [0, 2, 5], [0, 0, 0])
    assert y.shape == (2, 0, 4) and mask.shape == (0,)


def test_time_alignment_rejects_masks_of_different_batches():
    with pytest.raises(ValueError, match=r"mask_t holds 2 examples but mask_s 1; give both the same batch"):
        time_alignment("global", right_mask([2, 1], 2), right_mask([2], 2))
