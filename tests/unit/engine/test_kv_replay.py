"""The replay endpoint's deciding core (services/engine_server/kv_replay.py), without a socket: which batches a
request gets and in which frames (vLLM's replay protocol), which requests are refused, and when a replay whose
requester stopped reading is given up. Time is a parameter; nothing here sleeps."""

from __future__ import annotations

import pytest

from services.engine_server.kv_replay import END_SEQ, Replay, ReplayBuffer, ReplayDesk


def _seq(n: int) -> bytes:
    return n.to_bytes(8, "big")


def _buffer(n: int, capacity: int = 100) -> ReplayBuffer:
    buf = ReplayBuffer(capacity)
    for i in range(n):
        buf.add(f"batch {i}".encode())
    return buf


def _drain(replay: Replay) -> list[list[bytes]]:
    """Every message of a replay, as the socket would send them (each sent at once)."""
    out = []
    while (frames := replay.next_frames()) is not None:
        out.append(frames)
        replay.advance()
    return out


def _request(desk: ReplayDesk, frames: list[bytes]) -> Replay:
    assert desk.take(frames, now=0.0) is None
    [replay] = [r for r in desk.in_progress() if r.identity == frames[0]]
    return replay


def test_the_end_marker_is_minus_one_as_eight_signed_big_endian_bytes() -> None:
    assert END_SEQ == b"\xff" * 8 and int.from_bytes(END_SEQ, "big", signed=True) == -1


def test_a_replay_sends_each_kept_batch_from_the_asked_number_then_the_end_marker_in_vllms_frames() -> None:
    desk = ReplayDesk(_buffer(5))
    replay = _request(desk, [b"id1", b"", _seq(2)])
    assert _drain(replay) == [
        [b"id1", b"", _seq(2), b"batch 2"],
        [b"id1", b"", _seq(3), b"batch 3"],
        [b"id1", b"", _seq(4), b"batch 4"],
        [b"id1", b"", END_SEQ, b""],
    ]
    assert replay.done and desk.replays == 1


def test_the_buffer_keeps_the_last_capacity_batches_and_a_replay_from_an_evicted_number_starts_at_the_oldest() -> None:
    desk = ReplayDesk(_buffer(10, capacity=3))
    sent = _drain(_request(desk, [b"id", b"", _seq(0)]))
    assert [f[2] for f in sent] == [_seq(7), _seq(8), _seq(9), END_SEQ]  # the requester sees 0-6 are gone
    assert [f[3] for f in sent[:-1]] == [b"batch 7", b"batch 8", b"batch 9"]


def test_a_replay_from_the_next_number_is_only_the_end_marker_and_is_not_a_refusal() -> None:
    desk = ReplayDesk(_buffer(4))
    assert _drain(_request(desk, [b"id", b"", _seq(4)])) == [[b"id", b"", END_SEQ, b""]]
    assert desk.replays == 1 and sum(desk.refused.values()) == 0


def test_a_replay_is_the_buffer_as_it_was_when_asked_batches_added_later_are_not_in_it() -> None:
    buf = _buffer(3)
    replay = _request(ReplayDesk(buf), [b"id", b"", _seq(1)])
    buf.add(b"batch 3")
    assert [f[2] for f in _drain(replay)] == [_seq(1), _seq(2), END_SEQ]


def test_batches_evicted_before_their_turn_are_skipped_and_the_jump_shows_the_loss() -> None:
    buf = _buffer(5, capacity=5)
    replay = _request(ReplayDesk(buf), [b"id", b"", _seq(0)])
    assert replay.next_frames() == [b"id", b"", _seq(0), b"batch 0"]
    replay.advance()
    for i in range(5, 8):  # three more published while the requester reads: 0, 1 and 2 leave the buffer
        buf.add(f"batch {i}".encode())
    sent = _drain(replay)  # 5 .. 7 were published after it asked: not part of it
    assert [f[2] for f in sent] == [_seq(3), _seq(4), END_SEQ] and sent[0][3] == b"batch 3"


def test_a_replay_copies_nothing_whatever_the_buffer_holds() -> None:
    buf = _buffer(200_000, capacity=200_000)
    replay = _request(ReplayDesk(buf), [b"id", b"", _seq(0)])
    assert (replay.cursor, replay.end) == (0, 200_000) and replay.buffer is buf  # two numbers, not a snapshot
    assert replay.next_frames() == [b"id", b"", _seq(0), b"batch 0"]


def test_the_buffer_gives_only_kept_batches() -> None:
    buf = _buffer(7, capacity=3)
    assert (buf.first_seq, buf.next_seq, buf.get(4), buf.get(6)) == (4, 7, b"batch 4", b"batch 6")
    for seq in (3, 7, -1):
        with pytest.raises(IndexError):
            buf.get(seq)


def test_a_replay_still_running_after_the_longest_replay_time_is_abandoned() -> None:
    desk = ReplayDesk(_buffer(5), max_replay_s=120.0)
    assert desk.take([b"slow", b"", _seq(0)], now=1000.0) is None
    [replay] = desk.in_progress()
    replay.advance()  # it keeps reading, just often enough never to stall
    desk.expire(now=1119.9)
    assert desk.in_progress() == [replay]
    desk.expire(now=1120.0)
    assert desk.in_progress() == [] and desk.refused["abandoned"] == 1


@pytest.mark.parametrize("frames", [
    [b"id", b"", b"\x00" * 7],  # short
    [b"id", b"", b"\x00" * 9],  # long
    [b"id", b"", b""],  # empty
    [b"id", _seq(0)],  # no empty delimiter (a DEALER that did not add one)
    [b"id", b"x", _seq(0)],  # a delimiter that is not empty
    [b"id", b"", _seq(0), b"extra"],  # an extra frame
    [b"id", b"", (-1).to_bytes(8, "big", signed=True)],  # negative
    [b"id", b"", (-(2 ** 63)).to_bytes(8, "big", signed=True)],
    [b"id", b"", _seq(6)],  # beyond the next number: never sent
    [b"id", b"", _seq(2 ** 63 - 1)],
], ids=["short", "long", "empty", "no-delimiter", "bad-delimiter", "extra-frame", "minus-one", "most-negative",
        "ahead", "huge"])
def test_a_malformed_request_is_answered_with_the_end_marker_alone_and_counted(frames: list[bytes]) -> None:
    desk = ReplayDesk(_buffer(5))
    assert desk.take(frames, now=0.0) == [b"id", b"", END_SEQ, b""]
    assert desk.refused == {"malformed": 1, "busy": 0, "abandoned": 0}
    assert desk.in_progress() == [] and desk.replays == 0


def test_a_message_without_an_identity_is_counted_and_not_answered() -> None:
    desk = ReplayDesk(_buffer(1))
    assert desk.take([], now=0.0) is None and desk.refused["malformed"] == 1 and desk.in_progress() == []


def test_requests_beyond_the_replays_in_progress_limit_are_answered_with_the_end_marker_and_counted_busy() -> None:
    desk = ReplayDesk(_buffer(5), max_replays=2)
    _request(desk, [b"a", b"", _seq(0)])
    _request(desk, [b"b", b"", _seq(0)])
    assert desk.take([b"c", b"", _seq(0)], now=0.0) == [b"c", b"", END_SEQ, b""]
    assert desk.refused["busy"] == 1 and len(desk.in_progress()) == 2


def test_a_finished_replay_frees_its_place() -> None:
    desk = ReplayDesk(_buffer(2), max_replays=1)
    first = _request(desk, [b"a", b"", _seq(0)])
    _drain(first)
    desk.finished(first)
    assert desk.in_progress() == []
    _request(desk, [b"b", b"", _seq(0)])
    assert desk.refused["busy"] == 0


def test_a_second_request_while_the_requesters_replay_runs_is_ignored_and_counted_busy() -> None:
    desk = ReplayDesk(_buffer(5))
    replay = _request(desk, [b"a", b"", _seq(3)])
    assert desk.take([b"a", b"", _seq(0)], now=0.0) is None  # an end marker now would cut its replay short for it
    assert desk.refused["busy"] == 1 and desk.in_progress() == [replay]
    assert [f[2] for f in _drain(replay)] == [_seq(3), _seq(4), END_SEQ]


def test_a_replay_blocked_for_the_stall_time_is_abandoned_and_counted() -> None:
    desk = ReplayDesk(_buffer(5), stall_s=10.0)
    replay = _request(desk, [b"a", b"", _seq(0)])
    desk.blocked(replay, now=100.0)
    desk.blocked(replay, now=105.0)  # still blocked: the stall is timed from the first refused send
    desk.expire(now=109.9)
    assert desk.in_progress() == [replay]
    desk.expire(now=110.0)
    assert desk.in_progress() == [] and desk.refused["abandoned"] == 1


def test_a_replay_that_makes_progress_is_not_abandoned() -> None:
    desk = ReplayDesk(_buffer(5), stall_s=10.0)
    replay = _request(desk, [b"a", b"", _seq(0)])
    desk.blocked(replay, now=100.0)
    replay.advance()  # the requester read some: a send succeeded
    desk.blocked(replay, now=108.0)
    desk.expire(now=115.0)
    assert desk.in_progress() == [replay] and desk.refused["abandoned"] == 0


def test_a_replay_whose_requester_left_is_dropped_and_counted_abandoned() -> None:
    desk = ReplayDesk(_buffer(5))
    replay = _request(desk, [b"a", b"", _seq(0)])
    desk.gone(replay)
    assert desk.in_progress() == [] and desk.refused["abandoned"] == 1


def test_replays_in_progress_take_turns_first() -> None:
    desk = ReplayDesk(_buffer(5))
    for ident in (b"a", b"b", b"c"):
        _request(desk, [ident, b"", _seq(0)])
    firsts = [desk.in_progress()[0].identity for _ in range(3)]
    assert sorted(firsts) == [b"a", b"b", b"c"]  # none always goes first and takes every pass's send budget


@pytest.mark.parametrize("capacity", [0, -1])
def test_the_buffer_holds_at_least_one_batch(capacity: int) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        ReplayBuffer(capacity)


def test_a_malformed_request_while_the_requesters_replay_runs_is_counted_and_not_answered() -> None:
    desk = ReplayDesk(_buffer(5))
    replay = _request(desk, [b"a", b"", _seq(3)])
    assert desk.take([b"a", b"", b"\x00"], now=0.0) is None  # an end marker would read as the end of its replay
    assert desk.refused["malformed"] == 1 and desk.in_progress() == [replay]
