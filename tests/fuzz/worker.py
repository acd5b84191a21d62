"""One libFuzzer process on one target, coverage-guided by atheris.

``python -m tests.fuzz.worker TARGET [libFuzzer flags] [CORPUS_DIR]``; started by
``tests.fuzz.run``, which reads its output.  ``pynbd.proto`` is imported
inside ``atheris.instrument_imports`` so its branches and comparisons guide the
mutations; the harness itself is not instrumented.  ``atheris.Fuzz`` never
returns: libFuzzer exits the process (0 when the runs are done, non-zero on a
crash or a timeout, after writing the input to its artifact prefix).
"""

from __future__ import annotations

import sys

import atheris


def main() -> None:
    name = sys.argv[1]
    with atheris.instrument_imports(include=["pynbd.proto"]):
        from tests.fuzz.targets import TARGETS  # imports pynbd.proto: instrumented
    atheris.Setup([sys.argv[0], *sys.argv[2:]], TARGETS[name])
    atheris.Fuzz()


if __name__ == "__main__":
    main()
