"""The bench's do-nothing ext_proc server (``bench/gateway.py --floor``) answers Envoy exactly as Gantry's
picker does when the pool holds its one endpoint, so the floor's request path is the picker's."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from bench.noop_ext_proc import NoopAnswers, NoopProcessor, NoopSync
from tests.unit.services.test_gateway_picker import Exchange, body_msg, chat, headers_msg, picker, report, resp_headers


async def test_every_answer_is_byte_identical_to_the_pickers_for_a_one_endpoint_pool() -> None:
    real, _ = picker(report("a", 8001))
    exchange = [headers_msg(), body_msg(chat()), resp_headers(served="127.0.0.1:8001",
                                                              content_type="application/json")]
    want = Exchange(real)
    expected = [(await want.send(m)).SerializeToString(deterministic=True) for m in exchange]
    got = Exchange(NoopProcessor(NoopAnswers("127.0.0.1:8001", "a")))  # type: ignore[arg-type]  # same protocol
    assert [(await got.send(m)).SerializeToString(deterministic=True) for m in exchange] == expected


async def test_the_stream_ends_when_envoy_closes_its_side() -> None:
    async def one_message() -> AsyncIterator[pb.ProcessingRequest]:
        yield headers_msg()
    answers = [a async for a in NoopProcessor(NoopAnswers("127.0.0.1:1", "x")).Process(one_message(), None)]
    assert [a.WhichOneof("response") for a in answers] == ["request_headers"]


def test_a_message_of_no_known_kind_is_an_error_not_a_wrong_answer() -> None:
    with pytest.raises(ValueError, match="unexpected"):
        NoopAnswers("127.0.0.1:1", "x").answer(pb.ProcessingRequest())


def test_the_sync_variant_answers_a_stream_as_the_asyncio_one_does() -> None:
    answers = NoopAnswers("127.0.0.1:1", "x")
    exchange = [headers_msg(), body_msg(chat()), resp_headers(served="127.0.0.1:1", content_type="application/json")]
    got = [a.SerializeToString(deterministic=True) for a in NoopSync(answers).Process(iter(exchange), None)]
    assert got == [answers.answer(m).SerializeToString(deterministic=True) for m in exchange]
