"""CLI latency bench: wall and CPU time of the read commands an operator types most (issue 17, target ≤ 0.5 s).

Starts the demo stack exactly as an operator does (``gantry up --workers 4 --demo``, real NATS and Redis, the
four placement services, emulated workers) under a temporary GANTRY_HOME on free ports, then runs each of
``gantry models``, ``workers``, ``instances``, ``explain llama-8b`` (and ``--version`` and a bare interpreter as
floors) as a fresh process ``--runs`` times after one warm-up (which caches the bytecode, as an operator's first
call does), and reports the median wall time and the median CPU time (user + system of the child) of each. Every
run must exit 0. Beside them, the import time of each command (``python -X importtime``: the sum over top-level
imports, the least of five runs), which a shared machine disturbs least.

Run: ``.venv/bin/python bench/cli.py [--runs 9]``. Writes docs/benchmarks/cli.{json,png}; the last line printed
is the JSON summary. On a shared machine compare CPU beside wall: wall includes waiting for a core.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.results import save  # noqa: E402
from ops.servers import free_port  # noqa: E402

GANTRY = str(Path(sys.executable).parent / "gantry")
TARGET_S = 0.5
READY = "Ctrl-C (or `gantry down`) stops everything"
COMMANDS: dict[str, list[str]] = {
    "models": ["models"],
    "workers": ["workers"],
    "instances": ["instances"],
    "explain": ["explain", "llama-8b"],
}
FLOORS: dict[str, list[str]] = {"--version": ["--version"]}
UP_TIMEOUT_S = 240.0
TOP_IMPORT = re.compile(r"^import time:\s+\d+ \|\s+(\d+) \| \S", re.MULTILINE)  # a top-level import: no indent


def stack_env(home: Path) -> dict[str, str]:
    """The environment of a private stack (and of the CLI that talks to it)."""
    # PYTHONDONTWRITEBYTECODE (set in some sandboxes) would make every call recompile the repo's modules; an
    # operator's Python caches bytecode after the first call (the warm-up run here), so the bench does too.
    env = {k: v for k, v in os.environ.items() if not k.startswith("GANTRY_") and k != "PYTHONDONTWRITEBYTECODE"}
    env.update(
        GANTRY_HOME=str(home), GANTRY_WEB_PORT="0", GANTRY_JS_STORAGE="memory", COLUMNS="120",
        GANTRY_NATS_URL=f"nats://127.0.0.1:{free_port()}", GANTRY_REDIS_URL=f"redis://127.0.0.1:{free_port()}/0",
        PYTHONPATH=str(REPO),
    )
    if "GANTRY_DATA_DIR" in os.environ:  # the reference data (model catalogue), when not at ../shared/data
        env["GANTRY_DATA_DIR"] = os.environ["GANTRY_DATA_DIR"]
    return env


def progress(text: str) -> None:
    """A progress line on stderr (stdout's last line is the JSON summary)."""
    print(f"[cli bench] {text}", file=sys.stderr, flush=True)


def timed(argv: list[str], env: dict[str, str]) -> tuple[float, float]:
    """(wall s, CPU s) of one run of ``argv``; a failing run stops the bench with its output."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    out = proc.stdout.read() if proc.stdout else b""
    err = proc.stderr.read() if proc.stderr else b""
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} exited {proc.returncode}:\n{out.decode()}\n{err.decode()}")
    return wall, usage.ru_utime + usage.ru_stime


def measure(argv: list[str], env: dict[str, str], runs: int) -> dict[str, float]:
    """Medians (and spread) of ``runs`` timed runs after one warm-up, and the import time."""
    timed(argv, env)
    samples = [timed(argv, env) for _ in range(runs)]
    walls, cpus = [w for w, _ in samples], [c for _, c in samples]
    return {
        "wall_median_s": round(statistics.median(walls), 3), "wall_min_s": round(min(walls), 3),
        "wall_max_s": round(max(walls), 3), "cpu_median_s": round(statistics.median(cpus), 3),
        "import_s": import_time(argv, env),
    }


def import_time(argv: list[str], env: dict[str, str], tries: int = 5) -> float:
    """Seconds ``argv`` spends importing (``-X importtime``, top-level imports summed), least of ``tries`` runs."""
    if argv[0] == GANTRY:  # the console script is a Python file: this interpreter with the flag runs the same call
        command = [sys.executable, "-X", "importtime", *argv]
    else:
        command = [argv[0], "-X", "importtime", *argv[1:]]
    best = float("inf")
    for _ in range(tries):
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
        best = min(best, sum(int(m.group(1)) for m in TOP_IMPORT.finditer(done.stderr)) / 1e6)
    return round(best, 3)


def start_stack(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """``gantry up --workers 4 --demo --no-gateway``, returned once the demo has reported (the CLI's figures
    stay comparable with earlier runs: no engine servers or Envoy competing for the CPU)."""
    proc = subprocess.Popen(
        [GANTRY, "up", "--workers", "4", "--demo", "--no-gateway"], env=env, stdout=log.open("wb"),
        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + UP_TIMEOUT_S
    while READY not in log.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise SystemExit(f"gantry up did not come up:\n{log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.5)
    return proc


def plot(result: dict[str, object], path: Path) -> None:
    """Median wall and CPU per command against the 0.5 s target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per = result["commands"]
    assert isinstance(per, dict)
    names = list(per)
    xs = range(len(names))
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.bar([x - 0.2 for x in xs], [per[n]["wall_median_s"] for n in names], width=0.4, label="wall (median)")
    ax.bar([x + 0.2 for x in xs], [per[n]["cpu_median_s"] for n in names], width=0.4, label="CPU (median)")
    ax.axhline(TARGET_S, color="tab:red", linestyle="--", label=f"target {TARGET_S} s")
    ax.set_xticks(list(xs), [f"gantry {n}" if n != "python" else "python -c pass" for n in names], rotation=15)
    ax.set_ylabel("seconds")
    ax.set_title(f"CLI latency, {result['runs']} runs each; load {result['load_before']} (1-min average)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    """Start the demo stack, time the commands, stop the stack, write the results."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=9)
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="gantry-cli-bench-") as tmp:
        home = Path(tmp)
        env = stack_env(home)
        progress("starting `gantry up --workers 4 --demo` ...")
        t0 = time.monotonic()
        stack = start_stack(env, home / "up.log")
        progress(f"stack up in {time.monotonic() - t0:.1f} s")
        try:
            load_before = round(os.getloadavg()[0], 2)
            commands: dict[str, dict[str, float]] = {}
            for n, (name, argv) in enumerate({**COMMANDS, **FLOORS}.items(), 1):
                progress(f"[{n}/{len(COMMANDS) + len(FLOORS) + 1}] gantry {' '.join(argv)} x {args.runs}")
                commands[name] = measure([GANTRY, *argv], env, args.runs)
                got = commands[name]
                progress(f"    median wall {got['wall_median_s']} s, CPU {got['cpu_median_s']} s, "
                         f"imports {got['import_s']} s")
            progress(f"[{len(COMMANDS) + len(FLOORS) + 1}/{len(COMMANDS) + len(FLOORS) + 1}] python -c pass")
            commands["python"] = measure([sys.executable, "-c", "pass"], env, args.runs)
            load_after = round(os.getloadavg()[0], 2)
        finally:
            subprocess.run([GANTRY, "down"], env=env, capture_output=True, timeout=90, check=False)
            try:
                stack.wait(timeout=60)
            except subprocess.TimeoutExpired:
                stack.kill()
    worst = max(commands[name]["wall_median_s"] for name in COMMANDS)
    result: dict[str, object] = {
        "bench": "cli", "target_s": TARGET_S, "runs": args.runs, "cores": os.cpu_count(),
        "load_before": load_before, "load_after": load_after, "commands": commands,
        "worst_read_wall_median_s": worst, "meets_target": worst <= TARGET_S,
    }
    if not args.no_write:
        save("cli", result, lambda png: plot(result, png))
    summary = {name: [c["wall_median_s"], c["cpu_median_s"], c["import_s"]] for name, c in commands.items()}
    print(json.dumps({"bench": "cli", "wall_cpu_median_import_s": summary, "worst_read_wall_median_s": worst,
                      "meets_target": worst <= TARGET_S, "load": [load_before, load_after]}))


if __name__ == "__main__":
    main()
