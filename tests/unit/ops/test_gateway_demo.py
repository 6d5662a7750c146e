"""`python -m ops.gateway_demo` refuses a bad command line in one line before it starts anything."""

from __future__ import annotations

from pathlib import Path

import pytest

import ops.gateway_demo


@pytest.mark.parametrize("port", ["0", "-1", "65536", "70000"])
def test_a_port_envoy_cannot_listen_on_is_refused_before_anything_starts(
    port: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def started(*args: object, **kw: object) -> None:
        raise AssertionError("NATS was started")

    monkeypatch.setattr(ops.gateway_demo, "start_nats", started)
    with pytest.raises(SystemExit) as exit_:
        ops.gateway_demo.main(["--port", port, "--workdir", str(tmp_path / "demo")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.strip().endswith("error: --port must be between 1 and 65535"), err
