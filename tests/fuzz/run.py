"""The long-running, coverage-guided fuzzer of the sans-IO core (atheris + libFuzzer).

::

    .venv/bin/python -m tests.fuzz.run --inputs 1000000 [--target server|client|format|all|NAME]
                                       [--corpus DIR] [--timeout S] [--max-time S]
    .venv/bin/python -m tests.fuzz.run --target NAME --replay FILE...

Runs each target of the chosen role(s) in its own libFuzzer process
(``tests.fuzz.worker``) for ``--inputs`` inputs, one after another, and prints
per target: inputs executed, exec/s, coverage (libFuzzer's ``cov``: edges of
``pynbd.proto`` reached, and ``ft``: features, i.e. edges by hit count plus
comparison values) and crashes.  A crash is any exception other than
``ProtocolError`` escaping the core, a failed invariant, an endless event loop,
or an input running longer than ``--timeout`` seconds; its input is kept in
``--artifacts`` and can be replayed without atheris (``--replay``).  Exit
status: 0 clean, 1 a crash, 2 atheris missing or bad arguments.

Run from the repository root (``tests`` must be importable).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import deque
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
#: lines of a failing worker's output kept to show the failure
_TAIL = 60
_STATUS = re.compile(r"^#(\d+)\s+(\w+)\s+cov: (\d+) ft: (\d+) corp: (\d+)/")
_STAT = re.compile(r"^stat::(\w+):\s+(\d+)")
_ARTIFACT = re.compile(r"Test unit written to (\S+)")


#: how long past --max-time a worker may run before it is killed as stalled
_GRACE = 15


@dataclasses.dataclass
class Result:
    """What one target's run did."""

    target: str
    inputs: int = 0
    exec_per_sec: int = 0
    edges: int = 0
    features: int = 0
    corpus: int = 0
    peak_rss_mb: int = 0
    seconds: float = 0.0
    returncode: int = 0
    kind: str = ""
    artifact: str = ""
    detail: list[str] = dataclasses.field(default_factory=list)

    @property
    def crashed(self) -> bool:
        return self.returncode != 0

    def line(self) -> str:
        crashes = f"1 crash ({self.kind})" if self.crashed else "0 crashes"
        return (f"{self.target}: {self.inputs} inputs, {self.exec_per_sec} exec/s, "
                f"coverage {self.edges} edges / {self.features} features, "
                f"corpus {self.corpus}, peak RSS {self.peak_rss_mb} MiB, {crashes} "
                f"({self.seconds:.0f} s)")


def _parser() -> argparse.ArgumentParser:
    from tests.fuzz.targets import ROLES, TARGETS

    parser = argparse.ArgumentParser(prog="python -m tests.fuzz.run",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--inputs", type=int, default=1_000_000,
                        help="inputs to run per target (default 1000000)")
    parser.add_argument("--target", default="all", choices=[*ROLES, *TARGETS],
                        help="a role (server, client, all) or one target (default all)")
    parser.add_argument("--corpus", type=Path,
                        help="keep each target's corpus in DIR/TARGET and start from it "
                             "(default: a temporary corpus of seed inputs)")
    parser.add_argument("--artifacts", type=Path,
                        help="where crashing inputs go (default: a new temporary dir, "
                             "removed if nothing crashed)")
    parser.add_argument("--timeout", type=int, default=10,
                        help="seconds one input may take before it counts as a hang")
    parser.add_argument("--max-time", type=int, default=0,
                        help="stop each target after S seconds even if inputs remain")
    parser.add_argument("--max-len", type=int, default=4096, help="longest input in bytes")
    parser.add_argument("--seed", type=int, default=0, help="libFuzzer's seed (0: random)")
    parser.add_argument("--verbose", action="store_true", help="show libFuzzer's output")
    parser.add_argument("--replay", type=Path, nargs="+", metavar="FILE",
                        help="run these inputs through --target in this process "
                             "(no atheris needed) and show any crash")
    return parser


def _seed_corpus(target: str, corpus: Path) -> None:
    from tests.fuzz.targets import seeds

    corpus.mkdir(parents=True, exist_ok=True)
    if not any(corpus.iterdir()):
        for i, data in enumerate(seeds(target)):
            (corpus / f"seed-{i}").write_bytes(data)


def _classify(tail: deque[str]) -> str:
    text = "\n".join(tail)
    if tail and tail[-1].startswith("stalled:"):
        return "stalled"
    if "libFuzzer: timeout" in text:
        return "timeout"
    if "out-of-memory" in text:
        return "out of memory"
    if "Uncaught Python exception" in text:
        return "exception"
    return "crash"


def _detail(tail: deque[str]) -> list[str]:
    """The Python exception or timeout report in the worker's last lines."""
    # lines are cut short: libFuzzer also prints the whole input, in hex and escaped
    lines = [line[:160] for line in tail]
    for marker in ("=== Uncaught Python exception", "=== Timeout", "ERROR: libFuzzer"):
        for i, line in enumerate(lines):
            if marker in line:
                return lines[i:i + 30]
    return lines[-20:]


def _parse(line: str, result: Result) -> None:
    """Take the figures libFuzzer prints (status lines, final stats, the crash file)."""
    if status := _STATUS.match(line):
        result.inputs = int(status[1])
        result.edges, result.features = int(status[3]), int(status[4])
        result.corpus = int(status[5])
    elif stat := _STAT.match(line):
        value = int(stat[2])
        if stat[1] == "number_of_executed_units":
            result.inputs = value
        elif stat[1] == "average_exec_per_sec":
            result.exec_per_sec = value
        elif stat[1] == "peak_rss_mb":
            result.peak_rss_mb = value
    elif artifact := _ARTIFACT.search(line):
        result.artifact = artifact[1]


def run_target(target: str, args: argparse.Namespace, corpus: Path,
               artifacts: Path) -> Result:
    """One libFuzzer process on ``target``; its figures read from its output."""
    _seed_corpus(target, corpus)
    cmd = [sys.executable, "-m", "tests.fuzz.worker", target, f"-runs={args.inputs}",
           f"-timeout={args.timeout}", f"-max_len={args.max_len}", f"-seed={args.seed}",
           "-print_final_stats=1", f"-artifact_prefix={artifacts}/{target}-"]
    if args.max_time:
        cmd.append(f"-max_total_time={args.max_time}")
    cmd.append(str(corpus))
    result = Result(target)
    tail: deque[str] = deque(maxlen=_TAIL)
    start = time.monotonic()
    # libFuzzer reports on stderr, atheris prints Python tracebacks on stdout: read both
    with subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, errors="replace") as proc:
        assert proc.stdout is not None
        # a worker that outlives --max-time (libFuzzer's own limits did not stop it:
        # a stall outside any input) is killed, and reported with its last lines
        watchdog = threading.Timer(args.max_time + _GRACE, proc.kill) if args.max_time \
            else None
        if watchdog is not None:
            watchdog.start()
        try:
            for raw in proc.stdout:
                line = raw.rstrip("\n")
                tail.append(line)
                if args.verbose or "\tpulse " in line:
                    print(f"  {target}: {line}", flush=True)
                _parse(line, result)
        finally:
            if watchdog is not None:
                watchdog.cancel()
            if proc.poll() is None:  # interrupted (Ctrl-C): stop the worker too
                proc.kill()
        result.returncode = proc.wait()
        if args.max_time and time.monotonic() - start > args.max_time + _GRACE:
            tail.append(f"stalled: the worker outlived --max-time {args.max_time} s")
    result.seconds = time.monotonic() - start
    if not result.exec_per_sec and result.seconds:
        # libFuzzer rounds a run under a second down to 0: count it ourselves
        result.exec_per_sec = round(result.inputs / result.seconds)
    if result.crashed:
        result.kind = _classify(tail)
        result.detail = _detail(tail)
    return result


def replay(target: str, files: list[Path]) -> int:
    """Run saved inputs through ``target`` here, without atheris; 1 if any crashes."""
    from tests.fuzz.targets import TARGETS

    failed = 0
    for path in files:
        try:
            TARGETS[target](path.read_bytes())
        except Exception:
            failed += 1
            print(f"{path}: CRASH")
            traceback.print_exc(file=sys.stdout)
        else:
            print(f"{path}: ok")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    from tests.fuzz.targets import ROLES

    args = _parser().parse_args(argv)
    if args.replay:
        if args.target in ROLES:
            print("--replay needs one target, e.g. --target server-handshake")
            return 2
        return replay(args.target, args.replay)
    try:
        importlib.import_module("atheris")
    except ImportError:
        print("atheris is not installed: pip install atheris (it is in the 'test' extra)")
        return 2
    if args.inputs < 1:
        print("--inputs must be at least 1")
        return 2
    targets = ROLES.get(args.target, [args.target])
    made_artifacts = args.artifacts is None
    artifacts = (Path(tempfile.mkdtemp(prefix="pynbd-fuzz-artifacts-")) if made_artifacts
                 else args.artifacts.resolve())
    artifacts.mkdir(parents=True, exist_ok=True)
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="pynbd-fuzz-corpus-") as scratch:
        for target in targets:
            base = args.corpus.resolve() if args.corpus else Path(scratch)
            print(f"fuzzing {target} for {args.inputs} inputs ...", flush=True)
            result = run_target(target, args, base / target, artifacts)
            results.append(result)
            print(result.line(), flush=True)
            if result.crashed:
                print(f"  input: {result.artifact or '(not written)'}")
                print(f"  replay: python -m tests.fuzz.run --target {target} "
                      f"--replay {result.artifact}")
                for line in result.detail:
                    print(f"  | {line}")
    crashes = sum(r.crashed for r in results)
    total = sum(r.inputs for r in results)
    print(f"total: {total} inputs over {len(results)} targets, {crashes} crashes")
    if made_artifacts and not crashes:
        shutil.rmtree(artifacts, ignore_errors=True)
    return 1 if crashes else 0


if __name__ == "__main__":
    sys.exit(main())
