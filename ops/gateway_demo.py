"""``python -m ops.gateway_demo``: a gateway to try on a laptop, in the foreground until Ctrl-C.

Starts its own NATS (no auth, a free port), ``--engines`` emulated model servers, one Gantry endpoint picker
and Envoy listening on ``--port``; prints how to send a chat completion and how to watch it routed with
``gantry gateway``. Logs go under ``--workdir``. Everything it started stops on Ctrl-C (or SIGTERM).
"""

from __future__ import annotations

import argparse
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType

from ops.envoy import ADMIN_SOCKET, EXT_PROC_MODES, EnvoyOptions, picker_sockets, start_envoy
from ops.servers import ServerProcess, ServerStartError, free_port, start_nats, stop_processes, wait_http
from services.gateway.protocol import PickerTransport

MODEL = "demo-model"


def _wait_routable(url: str, picker: subprocess.Popen[bytes], timeout: float = 90) -> None:
    """Until the picker answers through Envoy with the model in its pool (then a moment for the endpoint
    file it wrote to reach Envoy)."""
    wait_http(f"{url}/v1/models", picker, timeout, ready=lambda r: r.status_code == 200 and MODEL in r.text)
    time.sleep(0.5)


def main(argv: list[str] | None = None) -> None:
    """Start the demo gateway and wait for Ctrl-C."""
    p = argparse.ArgumentParser(prog="python -m ops.gateway_demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int, default=8080, help="Envoy's listener (the OpenAI endpoint)")
    p.add_argument("--engines", type=int, default=3, help="emulated model servers")
    p.add_argument("--workdir", type=Path, default=Path(".gantry/gateway-demo"))
    p.add_argument("--capture", type=Path, default=None, help="also record the routed traffic as a trace here")
    p.add_argument("--transport", choices=[t.value for t in PickerTransport], default=PickerTransport.EXT_PROC.value,
                   help="how Envoy asks the picker (docs/gateway.md, \"The ext_authz transport\")")
    p.add_argument("--ext-proc-mode", choices=list(EXT_PROC_MODES), default="buffered",
                   help="ext_proc's exchange: buffered, or gie (both bodies full duplex, as GIE's gateways send them)")
    a = p.parse_args(argv)
    transport = PickerTransport(a.transport)
    if transport is PickerTransport.EXT_AUTHZ and a.capture:
        p.error("--capture needs --transport ext_proc")
    if transport is PickerTransport.EXT_AUTHZ and a.ext_proc_mode != "buffered":
        p.error("--ext-proc-mode needs --transport ext_proc")
    if not 1 <= a.engines <= 16:
        p.error("--engines must be between 1 and 16")
    if not 1 <= a.port <= 65535:  # Envoy's own refusal came after NATS and the engines had started, unreadable
        p.error("--port must be between 1 and 65535")
    a.workdir.mkdir(parents=True, exist_ok=True)
    procs: list[subprocess.Popen[bytes]] = []
    servers: list[ServerProcess] = []
    sockets: Path | None = None

    def stop(_sig: int = 0, _frame: FrameType | None = None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        nats = start_nats(a.workdir / "nats")
        servers.append(nats)
        logs = (a.workdir / "processes.log").open("ab")
        for i in range(a.engines):
            port = free_port()
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "services.engine_server", "--port", str(port), "--served-model-name", MODEL,
                 "--nats-url", nats.url, "--instance-id", f"engine-{i}", "--disable-uvicorn-access-log"],
                stdout=logs, stderr=subprocess.STDOUT))
            wait_http(f"http://127.0.0.1:{port}/health", procs[-1])
        eds = (a.workdir / "eds" / "engines.json").resolve()
        # the picker on unix sockets only Envoy (this user) can reach; a short directory: a socket's path is
        # limited to 107 bytes, and the workdir may be deep
        sockets = Path(tempfile.mkdtemp(prefix="gantry-picker-"))
        extra = ["--capture", str(a.capture)] if a.capture else []
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "services.gateway", "--nats-url", nats.url, "--eds-path", str(eds),
             "--socket-dir", str(sockets), "--transport", transport.value, *extra],
            stdout=logs, stderr=subprocess.STDOUT))
        # ext_authz: checks on the picker's HTTP socket, the access log to its gRPC socket
        grpc_socket, http_socket = picker_sockets(sockets)
        epp, als = (http_socket, grpc_socket) if transport is PickerTransport.EXT_AUTHZ else (grpc_socket, ())
        # Envoy's admin (it can stop Envoy, unauthenticated) on a socket only this user may open, beside the picker's
        servers.append(start_envoy(EnvoyOptions(listen_port=a.port, admin_port=sockets / ADMIN_SOCKET, epp_port=epp,
                                                als_port=als, transport=transport, eds_path=eds,
                                                ext_proc_mode=EXT_PROC_MODES[a.ext_proc_mode]),
                                   a.workdir / "envoy"))
        _wait_routable(f"http://127.0.0.1:{a.port}", procs[-1])
        print(f"gateway on http://127.0.0.1:{a.port} (model {MODEL!r}, {a.engines} emulated engines)\n"
              f"  curl -s localhost:{a.port}/v1/chat/completions -H 'content-type: application/json' \\\n"
              f"    -d '{{\"model\":\"{MODEL}\",\"messages\":[{{\"role\":\"user\",\"content\":\"hi\"}}]}}'\n"
              f"  gantry gateway --nats-url {nats.url} --watch\n"
              f"Ctrl-C stops everything (logs in {a.workdir})", flush=True)
        while all(pr.poll() is None for pr in procs) and all(s.alive() for s in servers):
            time.sleep(0.5)
        print("a process of the demo exited; stopping", file=sys.stderr)
    except ServerStartError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        pass
    finally:
        stop_processes(procs)
        for s in reversed(servers):
            s.stop()
        if sockets is not None:
            shutil.rmtree(sockets, ignore_errors=True)


if __name__ == "__main__":
    main()
