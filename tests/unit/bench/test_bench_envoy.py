"""The benches' Envoys (bench/gateway.py, bench/gateway_vs_sglang.py) keep their admin API (which can stop
Envoy, unauthenticated) on a unix socket only this user may open, never on a TCP port any local user reaches."""

from __future__ import annotations

from pathlib import Path

from bench.gateway import bench_envoy
from ops.envoy import envoy_config


def test_a_bench_envoy_serves_its_admin_on_a_unix_socket_in_its_workdir(tmp_path: Path) -> None:
    opts = bench_envoy(tmp_path / "envoy", epp_port=tmp_path / "picker.sock", eds_path=tmp_path / "eds.json")
    assert isinstance(opts.admin_port, Path) and opts.admin_port.parent == (tmp_path / "envoy").resolve()
    admin = envoy_config(opts)["admin"]["address"]
    assert set(admin) == {"pipe"} and admin["pipe"]["path"] == str(opts.admin_port)
