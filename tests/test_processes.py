import pytest

from kvlib.processes import side_by_side


def test_jobs_run_in_two_spawned_processes_and_come_back_by_key():
    jobs = {seed: {"seed": seed, "arm": "kava"} for seed in (0, 1, 2)}
    assert side_by_side(dict, jobs, 2) == {seed: {"seed": seed, "arm": "kava"} for seed in (0, 1, 2)}
    assert side_by_side(dict, jobs, 1) == side_by_side(dict, jobs, 2)


def test_a_failed_job_raises_its_own_error():
    with pytest.raises(TypeError, match="invalid keyword argument"):
        side_by_side(int, {0: {}, 1: {"x": "7"}}, 2)


@pytest.mark.parametrize("workers", [0, -1, True, 1.5, "2"])
def test_a_bad_worker_count_is_refused(workers):
    with pytest.raises(ValueError, match=f"workers={workers!r} must be an integer >= 1"):
        side_by_side(dict, {0: {}}, workers)
