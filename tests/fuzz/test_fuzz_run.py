"""The coverage-guided fuzzer on a short budget, as CI runs it.

Each run is a subprocess (``atheris.Fuzz`` never returns).  Besides the clean
run of every target, broken-on-purpose targets prove that a crash and a hang
are caught, reported and replayable, and every input the fuzzer once crashed
on (tests/fuzz/regressions, named TARGET-what) is replayed through its target.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from tests.fuzz.run import ROOT
from tests.fuzz.targets import ROLES, TARGETS

#: inputs per target in CI: a few seconds in all
CI_INPUTS = 5000
REGRESSIONS = sorted((Path(__file__).parent / "regressions").iterdir())
LINE = re.compile(r"^(?P<target>[\w-]+): (?P<inputs>\d+) inputs, (?P<rate>\d+) exec/s, "
                  r"coverage (?P<edges>\d+) edges / (?P<features>\d+) features, .*, "
                  r"(?P<crashes>\d+) crash", re.MULTILINE)


#: seconds one target's worker may fuzz (each takes 1-15 s here; a run that wanders
#: into slow inputs, a few ms each, once took 50 s for server-extended-transmission's
#: 5,000); one past it by the runner's grace is killed and reported as stalled, with
#: its last output lines
MAX_TIME = 60


def fuzz(*args: str, timeout: float | None = None) -> subprocess.CompletedProcess[str]:
    # --max-time: each worker stops by itself even if this test is killed; the runner
    # kills a stalled one, so the whole run is bounded by the number of targets
    if timeout is None:
        timeout = len(ROLES["all"]) * (MAX_TIME + 20) + 30
    return subprocess.run([sys.executable, "-m", "tests.fuzz.run", "--max-time", str(MAX_TIME),
                           *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          check=False)


def test_every_target_runs_clean_and_reports_coverage(tmp_path: Path) -> None:
    proc = fuzz("--inputs", str(CI_INPUTS), "--target", "all", "--artifacts", str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = {m["target"]: m for m in LINE.finditer(proc.stdout)}
    assert set(lines) == set(ROLES["all"]), proc.stdout
    for m in lines.values():
        assert int(m["inputs"]) == CI_INPUTS
        assert int(m["rate"]) > 0
        # the instrumentation of pynbd.proto works: many edges, features at least as many
        assert int(m["edges"]) > 100, m[0]
        assert int(m["features"]) >= int(m["edges"])
        assert m["crashes"] == "0"
    count = len(ROLES["all"])
    assert f"total: {count * CI_INPUTS} inputs over {count} targets, 0 crashes" in proc.stdout
    assert not any(tmp_path.iterdir()), "a crash input was written"


def test_a_crash_is_reported_with_a_replayable_input(tmp_path: Path) -> None:
    proc = fuzz("--inputs", str(CI_INPUTS), "--target", "selftest-crash",
                "--artifacts", str(tmp_path))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "1 crash (exception)" in proc.stdout
    assert "RuntimeError: selftest" in proc.stdout
    (crash,) = tmp_path.iterdir()
    replay = fuzz("--target", "selftest-crash", "--replay", str(crash))
    assert replay.returncode == 1
    assert "CRASH" in replay.stdout
    assert "RuntimeError: selftest" in replay.stdout


def test_a_hang_is_reported(tmp_path: Path) -> None:
    proc = fuzz("--inputs", str(CI_INPUTS), "--target", "selftest-hang", "--timeout", "1",
                "--artifacts", str(tmp_path))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "1 crash (timeout)" in proc.stdout
    assert [p.name.startswith("selftest-hang-timeout-") for p in tmp_path.iterdir()] == [True]


def test_without_atheris_the_command_says_so_and_exits_2() -> None:
    code = ("import sys; sys.modules['atheris'] = None; from tests.fuzz.run import main; "
            "sys.exit(main(['--inputs', '1']))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, check=False)
    assert proc.returncode == 2
    assert proc.stdout.count("\n") == 1
    assert "atheris is not installed" in proc.stdout


def test_regressions_name_their_target() -> None:
    assert REGRESSIONS
    for path in REGRESSIONS:
        assert any(path.name.startswith(f"{target}-") for target in TARGETS), path.name


@pytest.mark.parametrize("path", REGRESSIONS, ids=lambda p: p.name)
def test_saved_crash_input_no_longer_crashes(path: Path) -> None:
    (target,) = [t for t in ROLES["all"] if path.name.startswith(f"{t}-")]
    TARGETS[target](path.read_bytes())
