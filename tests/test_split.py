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
