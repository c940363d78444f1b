"""The history checker catches what it must, and only that (seeded histories)."""

from __future__ import annotations

from kvmemo.chaos import counter_violations
from kvmemo.chaos.history import Op, Outcome, check

OK, FAILED, UNKNOWN = Outcome.OK, Outcome.FAILED, Outcome.UNKNOWN


def op(
    i: int,
    kind: str,
    keys: tuple[str, ...],
    values: tuple[str | None, ...],
    t0: float,
    t1: float,
    outcome: Outcome = OK,
    ttl: float | None = None,
    result: int | None = None,
) -> Op:
    return Op(i, 0, kind, keys, values, t0, t1, outcome, ttl, None, result)


def rules(history: list[Op]) -> list[str]:
    return [v.rule for v in check(history)]


def test_a_clean_history_has_no_violation() -> None:
    h = [
        op(1, "set", ("k",), ("a",), 0.0, 1.0),
        op(2, "get", ("k",), ("a",), 1.5, 2.0),
        op(3, "set", ("k",), ("b",), 2.5, 3.0),
        op(4, "get", ("k",), ("b",), 3.5, 4.0),
        op(5, "del", ("k",), (None,), 4.5, 5.0),
        op(6, "get", ("k",), (None,), 5.5, 6.0),
    ]
    assert rules(h) == []


def test_a_lost_write_is_caught() -> None:
    h = [op(1, "set", ("k",), ("a",), 0.0, 1.0), op(2, "get", ("k",), (None,), 2.0, 3.0)]
    assert rules(h) == ["lost-write"]


def test_a_stale_read_is_caught() -> None:
    h = [
        op(1, "set", ("k",), ("a",), 0.0, 1.0),
        op(2, "set", ("k",), ("b",), 2.0, 3.0),
        op(3, "get", ("k",), ("a",), 4.0, 5.0),
    ]
    assert rules(h) == ["stale-read"]


def test_concurrent_writes_may_be_read_in_either_order() -> None:
    h = [
        op(1, "set", ("k",), ("a",), 0.0, 3.0),
        op(2, "set", ("k",), ("b",), 1.0, 2.0),
        op(3, "get", ("k",), ("a",), 4.0, 5.0),
    ]
    assert rules(h) == []


def test_a_value_never_written_is_a_phantom() -> None:
    assert rules([op(1, "get", ("k",), ("zzz",), 0.0, 1.0)]) == ["phantom"]


def test_a_read_older_than_an_earlier_read_is_caught() -> None:
    h = [
        op(1, "set", ("k",), ("a",), 0.0, 1.0),
        op(2, "set", ("k",), ("b",), 2.0, 8.0, UNKNOWN),
        op(3, "get", ("k",), ("b",), 3.0, 4.0),
        op(4, "get", ("k",), ("a",), 5.0, 6.0),
    ]
    assert "read-order" in rules(h)


def test_an_expired_value_must_not_be_served() -> None:
    h = [op(1, "set", ("k",), ("a",), 0.0, 0.1, ttl=0.5), op(2, "get", ("k",), ("a",), 1.0, 1.1)]
    assert rules(h) == ["expired-read"]


def test_an_expire_after_the_write_may_give_its_value_a_later_deadline() -> None:
    # PEXPIRE replaces the TTL: here it may have run at 0.3, so the value may
    # live until 0.8 (was: flagged as served past the write's own deadline,
    # 0.6, as a real-server chaos run once reported).
    set_a = op(1, "set", ("k",), ("a",), 0.0, 0.1, ttl=0.5)
    pexpire = op(2, "expire", ("k",), (None,), 0.2, 0.3, ttl=0.5, result=1)
    h = [set_a, pexpire, op(3, "get", ("k",), ("a",), 0.7, 0.75)]
    assert rules(h) == []
    # Past the later deadline, or with an EXPIRE that did not apply (0), or
    # one done before the write began: served expired (past both deadlines,
    # the write's and the EXPIRE's, it is reported under each).
    late = rules([set_a, pexpire, op(3, "get", ("k",), ("a",), 0.9, 0.95)])
    assert set(late) == {"expired-read"}
    missed = op(2, "expire", ("k",), (None,), 0.2, 0.3, ttl=0.5, result=0)
    assert rules([set_a, missed, op(3, "get", ("k",), ("a",), 0.7, 0.75)]) == ["expired-read"]
    before = op(2, "expire", ("k",), (None,), -0.3, -0.05, ttl=1.0, result=1)
    assert rules([before, set_a, op(3, "get", ("k",), ("a",), 0.7, 0.75)]) == ["expired-read"]
    # One of unknown outcome may have run at any time after it began.
    unknown = op(2, "expire", ("k",), (None,), 0.2, 9.0, UNKNOWN, ttl=0.5)
    assert rules([set_a, unknown, op(3, "get", ("k",), ("a",), 5.0, 5.1)]) == []


def test_a_later_expire_may_move_an_expire_deadline() -> None:
    set_a = op(1, "set", ("k",), ("a",), 0.0, 0.1)
    first = op(2, "expire", ("k",), (None,), 0.2, 0.3, ttl=0.5, result=1)
    get_a = op(4, "get", ("k",), ("a",), 1.0, 1.05)
    assert rules([set_a, first, get_a]) == ["expired-read"]  # past 0.8
    # A second EXPIRE that may have run after the first gives until 1.1.
    second = op(3, "expire", ("k",), (None,), 0.5, 0.6, ttl=0.5, result=1)
    assert rules([set_a, first, second, get_a]) == []
    # Not one that ended before the first began.
    early = op(3, "expire", ("k",), (None,), 0.12, 0.15, ttl=0.5, result=1)
    assert rules([set_a, early, first, get_a]) == ["expired-read"]


def test_expiry_explains_a_missing_value() -> None:
    h = [op(1, "set", ("k",), ("a",), 0.0, 0.1, ttl=0.5), op(2, "get", ("k",), (None,), 1.0, 1.1)]
    assert rules(h) == []


def test_a_failed_write_is_never_required_and_an_unknown_one_may_be_seen() -> None:
    h = [
        op(1, "set", ("k",), ("a",), 0.0, 1.0),
        op(2, "set", ("k",), ("b",), 2.0, 3.0, FAILED),
        op(3, "get", ("k",), ("a",), 4.0, 5.0),
        op(4, "set", ("k",), ("c",), 6.0, 7.0, UNKNOWN),
        op(5, "get", ("k",), ("c",), 8.0, 9.0),
    ]
    assert rules(h) == []


def test_reading_the_value_of_a_failed_write_is_a_phantom_or_stale() -> None:
    h = [op(1, "set", ("k",), ("a",), 0.0, 1.0, FAILED), op(2, "get", ("k",), ("a",), 2.0, 3.0)]
    assert rules(h) == ["phantom"]


def test_a_torn_mset_is_caught() -> None:
    keys = ("g:a", "g:b")
    h = [
        op(1, "mset", keys, ("1:a", "1:b"), 0.0, 1.0),
        op(2, "mset", keys, ("2:a", "2:b"), 2.0, 3.0),
        op(3, "mget", keys, ("2:a", "1:b"), 4.0, 5.0),
    ]
    assert "torn-mset" in rules(h)


def test_an_mset_seen_whole_is_fine() -> None:
    keys = ("g:a", "g:b")
    h = [
        op(1, "mset", keys, ("1:a", "1:b"), 0.0, 1.0),
        op(2, "mget", keys, ("1:a", "1:b"), 2.0, 3.0),
        op(3, "mget", keys, (None, None), -2.0, -1.0),
    ]
    assert rules(h) == []


def test_counters_must_count_every_acknowledged_increment() -> None:
    h = [op(i, "incr", ("c",), (None,), i, i + 0.5, result=i) for i in range(1, 4)]
    assert counter_violations(h, {"c": 3}) == []
    assert [v.rule for v in counter_violations(h, {"c": 2})] == ["counter"]
    unknown = [*h, op(9, "incr", ("c",), (None,), 9, 9.5, UNKNOWN)]
    assert counter_violations(unknown, {"c": 4}) == []


def test_errors_that_may_have_applied_count_as_unknown() -> None:
    from kvmemo.chaos.workload import classify
    from kvmemo.client import DisconnectedError
    from kvmemo.errors import RequestTimeoutError, UnavailableError

    assert classify(UnavailableError("restarting", retry_after_ms=5))[0] is FAILED
    assert classify(RequestTimeoutError("late", applied=False))[0] is FAILED
    assert classify(RequestTimeoutError("late", applied=None))[0] is UNKNOWN
    assert classify(DisconnectedError("dropped", applied=None))[0] is UNKNOWN
    assert classify(ConnectionResetError())[0] is UNKNOWN
