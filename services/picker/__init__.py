"""The endpoint picker as a NATS request/reply service: ``PickRequest`` in, ``PickReply`` out (seed 002's
"replacement scheduler" protocol, so a picker written in another language can take its place), deciding with
the routing core kept current from the model servers' own reports."""
