"""Data order and batch layout of the offline loop (unit)."""
import pytest

from medgpt_ds.loop import epoch_layout, epoch_order, rank_micro_batches

pytestmark = pytest.mark.unit


def test_epoch_order_is_a_seeded_permutation():
    a, b = epoch_order(50, 0, 7), epoch_order(50, 0, 7)
    assert a == b and sorted(a) == list(range(50))
    assert epoch_order(50, 1, 7) != a  # a new order each epoch
    assert epoch_order(50, 0, 8) != a
    assert epoch_order(5, 0, 7, shuffle=False) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("n,micro,ga,world", [(50, 2, 3, 2), (17, 1, 1, 4), (64, 4, 2, 1), (10, 3, 1, 3)])
def test_ranks_partition_whole_steps(n, micro, ga, world):
    steps, left = epoch_layout(n, micro, ga, world)
    assert steps == n // (micro * ga * world) and left == n % (micro * ga * world)
    per_rank = [rank_micro_batches(n, 0, 1, micro, ga, r, world) for r in range(world)]
    assert all(len(b) == steps * ga for b in per_rank)  # every rank runs the same number of micro batches
    assert all(len(mb) == micro for b in per_rank for mb in b)
    seen = [i for b in per_rank for mb in b for i in mb]
    assert len(seen) == len(set(seen)) == steps * micro * ga * world  # no item twice, none lost beyond the remainder


def test_one_rank_ga2_sees_the_same_step_as_two_ranks_ga1():
    one = rank_micro_batches(40, 3, 5, 2, 2, 0, 1)
    two = [rank_micro_batches(40, 3, 5, 2, 1, r, 2) for r in range(2)]
    for step in range(10):
        a = set(one[2 * step]) | set(one[2 * step + 1])
        b = set(two[0][step]) | set(two[1][step])
        assert a == b
