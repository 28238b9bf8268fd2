from dialogtune.split import validation_groups


def test_share_is_rounded_and_seeded():
    groups = {f"dialogue{i}" for i in range(50)}
    held = validation_groups(groups, 0.1, seed=0)
    assert len(held) == 5 and held <= groups
    assert validation_groups(groups, 0.1, seed=1) != held


def test_small_sets_keep_at_least_one_on_each_side():
    assert len(validation_groups({"a", "b", "c"}, 0.01, 0)) == 1
    assert len(validation_groups({"a", "b"}, 0.9, 0)) == 1
    assert validation_groups({"a"}, 0.5, 0) == set()
    assert validation_groups({"a", "b"}, 0.0, 0) == set()


def test_the_streamed_cutoff_holds_out_exactly_the_chosen_groups():
    """prepare keeps only each example's group rank and decides at the end: the same groups."""
    import numpy as np

    from dialogtune.split import group_rank, validation_cutoff

    for count, share, seed in [(50, 0.1, 0), (7, 0.3, 4), (2, 0.9, 1), (1, 0.5, 0), (30, 0.0, 0), (1000, 0.25, 9)]:
        groups = [f"dialogue{i}" for i in range(count)]
        chosen = validation_groups(set(groups), share, seed)
        # Each group once per example it made: duplicates must not count twice.
        ranks = np.array([group_rank(seed, g) for g in groups for _ in range(1 + len(g) % 3)], dtype=np.uint64)
        cutoff = validation_cutoff(ranks, share)
        held = {g for g in groups if cutoff is not None and group_rank(seed, g) <= cutoff}
        assert held == chosen, (count, share, seed)
