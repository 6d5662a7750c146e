"""When the provisioner leaves a stream alone and when it reconfigures it (shared.bus.streams.stream_matches)."""

from __future__ import annotations

import dataclasses

from nats.js.api import RetentionPolicy, StreamConfig

from shared.bus.streams import STREAM_CMD, stream_configs, stream_matches
from shared.settings import Settings


def wanted(name: str = STREAM_CMD) -> StreamConfig:
    return next(cfg for cfg in stream_configs(Settings()) if cfg.name == name)


def as_the_server_reports(cfg: StreamConfig) -> StreamConfig:
    """The configuration round-tripped through the server's JSON form, with the server's defaults filled in."""
    reply = {**cfg.as_dict(), "max_consumers": -1, "max_msgs_per_subject": -1, "num_replicas": 1}
    reply.setdefault("max_msgs", -1)
    reply.setdefault("max_bytes", -1)
    return StreamConfig.from_response(reply)


def test_a_stream_as_provisioned_matches_and_is_not_updated() -> None:
    for cfg in stream_configs(Settings()):
        assert stream_matches(as_the_server_reports(cfg), cfg)


def test_a_shrunk_stream_differs_and_is_restored() -> None:
    shrunk = dataclasses.replace(wanted(), max_msgs=10)
    assert not stream_matches(as_the_server_reports(shrunk), wanted())


def test_a_stream_with_other_retention_or_subjects_differs() -> None:
    assert not stream_matches(
        as_the_server_reports(dataclasses.replace(wanted(), retention=RetentionPolicy.WORK_QUEUE)), wanted()
    )
    assert not stream_matches(as_the_server_reports(dataclasses.replace(wanted(), subjects=["x.>"])), wanted())
    assert not stream_matches(as_the_server_reports(dataclasses.replace(wanted(), max_age=60)), wanted())


def test_a_limit_gantry_leaves_unlimited_differs_once_set() -> None:
    assert wanted().max_msgs is None  # no count limit on the commands waiting: bytes bound them
    assert not stream_matches(as_the_server_reports(dataclasses.replace(wanted(), max_bytes=1 << 20)), wanted())


def test_the_durable_streams_each_have_a_share_of_the_store_and_refuse_when_full() -> None:
    from nats.js.api import DiscardPolicy

    from shared.bus.streams import PIPE_STREAMS, STREAM_STATUS

    configs = stream_configs(Settings(js_storage="memory"))
    for name in (STREAM_CMD, *PIPE_STREAMS, STREAM_STATUS):  # nothing unhandled is discarded to make room...
        assert wanted(name).max_bytes and wanted(name).discard is DiscardPolicy.NEW
        assert wanted(name).retention is RetentionPolicy.INTEREST  # ...and what is handled does not stay
    assert sum(cfg.max_bytes or 0 for cfg in configs) < 256 << 20  # the local stack's memory store holds them all
    assert not stream_matches(as_the_server_reports(dataclasses.replace(wanted(), discard=DiscardPolicy.OLD)),
                              wanted())


def test_each_pipeline_stage_reads_a_stream_of_its_own_with_its_own_byte_limit() -> None:
    from shared.bus.streams import ALL_CONSUMERS, PIPE_STREAMS, PIPE_SUBJECTS

    configs = {cfg.name: cfg for cfg in stream_configs(Settings(pipe_max_bytes=1 << 20))}
    readers = {stream: subject for stream, _, subject in ALL_CONSUMERS if stream in PIPE_STREAMS}
    assert readers == PIPE_SUBJECTS  # one consumer per pipeline stream, on the one subject it stores
    for name in PIPE_STREAMS:  # a stage's output goes to the next stream: it never competes with its input for room
        assert configs[name].subjects == [PIPE_SUBJECTS[name]]
        assert configs[name].max_bytes == 1 << 20


def test_no_two_streams_store_one_subject_and_the_older_builds_pipeline_is_not_provisioned() -> None:
    from shared.bus import subjects
    from shared.bus.streams import ALL_STREAMS, LEGACY_PIPE

    names = [cfg.name for cfg in stream_configs(Settings())]
    assert names == list(ALL_STREAMS) and LEGACY_PIPE not in names
    stored = [s for cfg in stream_configs(Settings()) for s in cfg.subjects or ()]
    assert len(stored) == len(set(stored))
    assert subjects.PIPE_ALL not in stored  # the older build's wildcard, which overlaps every stage's subject
