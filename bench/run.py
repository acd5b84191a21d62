"""Benchmark pynbd against qemu-nbd, nbdkit and nbd-server with fio and nbdcopy.

Every server exports the same raw image (filled with random data, kept in the
page cache) on a Unix socket in a private temp dir.  For each round, for each
job, each server runs in turn, the order rotated by one every round (A B C D,
B C D A, C D A B, ...).  Server CPU is read from /proc/PID/stat (utime+stime+cutime+
cstime summed over the process tree, so nbd-server's per-client children
count) before and after each run.  Results:
a table on stdout, ``results.json`` and, if matplotlib is importable,
``ratios.png`` in --out.  Servers are stopped by pid in a ``finally``.

``--backends ...,rbd`` adds a Ceph RBD column (not in the default run): the
script starts a throwaway one-OSD cluster in its temp dir (bench/rbdcluster.py,
stopped in a ``finally``), imports the same image into one RBD image, and
runs pynbd and qemu-nbd (the only servers here with RBD support) on that
image; the OSD's CPU is measured next to the server's.

``--backends ...,qcow2`` adds a qcow2 column (not in the default run either):
pynbd and qemu-nbd each on their own qcow2 copy of the image, plus jobs h and
i and nbdcopy-in writing into fresh empty qcow2 images, each checked with
``qemu-img check`` (bench/qcow2jobs.py).

This module owns the command line, the plan, the rounds and main; the other
modules beside it: procs.py (process trees, CPU), servers.py (server command
lines, start, stop), workloads.py (jobs, fio and nbdcopy runs), qcow2jobs.py
and report.py (medians, ratios, tables, chart, JSON).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import qcow2jobs
import rbdcluster  # the throwaway Ceph cluster for the rbd column
from procs import run_cmd
from report import environment, format_table, summarize, write_chart, write_json
from servers import ALL_SERVERS, RBD_IMAGE, Server, serves, set_baseline, start_server, stop_server
from workloads import (
    ALL_JOBS,
    FIO_JOBS,
    MIB,
    TITLES,
    Sample,
    copy_in,
    copy_in_rbd,
    copy_out,
    copy_timeout,
    make_image,
    run_fio,
)

from pynbd.block import parse_size

_S = TypeVar("_S")

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

ALL_BACKENDS = ("file", "memory", "rbd", "qcow2")
DEFAULT_BACKENDS = ("file", "memory")


def _csv(allowed: tuple[str, ...]) -> Any:
    def parse(text: str) -> list[str]:
        items = [x.strip() for x in text.split(",") if x.strip()]
        bad = [x for x in items if x not in allowed]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"choose from {','.join(allowed)}")
        return [x for x in allowed if x in items]
    return parse


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true", help="1 round of 3 s runs")
    p.add_argument("--rounds", type=int, help="rounds (default 3, --quick 1)")
    p.add_argument("--runtime", type=int, help="seconds per fio run (default 10, --quick 3)")
    p.add_argument("--size", type=parse_size, default=parse_size("2G"), help="image size (2G)")
    p.add_argument("--servers", type=_csv(ALL_SERVERS),
                   default=[s for s in ALL_SERVERS if s not in ("pynbd-base", "pynbd-metrics")],
                   help="default: all but pynbd-base (which needs --baseline) and "
                   "pynbd-metrics (pynbd with --metrics, for the A/B of its cost)")
    p.add_argument("--backends", type=_csv(ALL_BACKENDS), default=list(DEFAULT_BACKENDS),
                   help="file,memory (default) and/or rbd (a throwaway Ceph cluster; pynbd "
                   "and qemu-nbd only) and/or qcow2 (a qcow2 copy per server; pynbd and "
                   "qemu-nbd only)")
    p.add_argument("--jobs", type=_csv(ALL_JOBS), default=list(ALL_JOBS),
                   help="h and i run on the qcow2 backend only")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    p.add_argument("--tmpdir", help="where the image and sockets go (default: system temp)")
    p.add_argument("--baseline", type=Path, metavar="DIR",
                   help="a checkout of pynbd to run as server pynbd-base, for A/B runs "
                   "(e.g. git worktree add DIR REV; then --servers pynbd,pynbd-base)")
    args = p.parse_args(argv)
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.runtime = args.runtime or (3 if args.quick else 10)
    if args.rounds < 1 or args.runtime < 1 or args.size < 16 * MIB or args.size % MIB:
        p.error("rounds and runtime must be >= 1, size a multiple of 1M and >= 16M")
    if ("pynbd-base" in args.servers) != (args.baseline is not None):
        p.error("--baseline DIR and the server pynbd-base go together")
    if args.baseline is not None and not (args.baseline / "src" / "pynbd").is_dir():
        p.error(f"--baseline {args.baseline}: no src/pynbd there")
    return args


def plan(args: argparse.Namespace) -> tuple[dict[str, list[str]], float]:
    """Servers per backend, and the expected duration in seconds."""
    per_backend = {b: [s for s in args.servers if serves(s, b)] for b in args.backends}
    per_backend = {b: s for b, s in per_backend.items() if s}
    fio_runs = sum(len(s) * sum(j.key in args.jobs and j.runs_on(b) for j in FIO_JOBS)
                   for b, s in per_backend.items())
    fresh_runs = len(per_backend.get("qcow2", [])) * sum(
        j.key in args.jobs and j.fresh for j in FIO_JOBS)
    copy_s = args.size / 400e6 + 2  # a guess: ~400 MB/s plus start-up
    copies = sum(len(s) for s in per_backend.values()) * ("nbdcopy-out" in args.jobs)
    copies += len(args.servers) * ("nbdcopy-in" in args.jobs and memory_copy_in(args))
    copies += len(per_backend.get("rbd", [])) * ("nbdcopy-in" in args.jobs)
    copies += 2 * len(per_backend.get("qcow2", [])) * ("nbdcopy-in" in args.jobs)  # + compare
    setup = args.size / 500e6 + 5 * len(args.servers)
    if "rbd" in per_backend:  # cluster start, rbd import
        setup += 10 + args.size / 300e6
    if "qcow2" in per_backend:  # a qemu-img convert per server
        setup += len(per_backend["qcow2"]) * (args.size / 300e6 + 1)
    per_round = fio_runs * (args.runtime + 1.5) + fresh_runs * 2 + copies * copy_s
    return per_backend, setup + args.rounds * per_round


def memory_copy_in(args: argparse.Namespace) -> bool:
    """The memory-target nbdcopy-in row runs if file or memory is among the backends."""
    return any(b in ("file", "memory") for b in args.backends)


def order(group: Sequence[_S], rnd: int) -> list[_S]:
    """Servers in turn, the order rotated by one each round, so that over as
    many rounds as servers each goes first once: whoever goes first meets
    colder caches (the in-memory OSD's heap, the page cache), and the first
    copy of a copy phase ran 2-3x slower in every run here, whoever made it.
    (Reversing every other round, as before, put only the first and the
    last server of the list first.)"""
    shift = rnd % len(group) if group else 0
    return [*group[shift:], *group[:shift]]


Run = tuple[str, str, str, "Callable[[], Sample]"]  # job, backend, server, the run


def round_runs(rnd: int, args: argparse.Namespace, servers: dict[str, list[Server]],
               image: Path, workdir: Path,
               cluster: rbdcluster.Cluster | None = None) -> list[Run]:
    """The runs of round ``rnd``, in order: per job, per backend, each server in turn."""
    runs: list[Run] = []
    for job in FIO_JOBS:
        if job.key in args.jobs:
            for backend, group in servers.items():
                for srv in order(group, rnd) if job.runs_on(backend) else []:
                    run = (functools.partial(qcow2jobs.run_fio_fresh, srv.name, job,
                                             args.runtime, args.size, workdir, rnd)
                           if job.fresh else
                           functools.partial(run_fio, srv, job, args.runtime, args.size, rnd))
                    runs.append((job.key, backend, srv.name, run))
    if "nbdcopy-out" in args.jobs:
        for backend, group in servers.items():
            runs += [("nbdcopy-out", backend, srv.name,
                      functools.partial(copy_out, srv, args.size, workdir, rnd))
                     for srv in order(group, rnd)]
    if "nbdcopy-in" not in args.jobs:
        return runs
    if memory_copy_in(args):
        runs += [("nbdcopy-in", "memory", name,
                  functools.partial(copy_in, name, image, args.size, workdir, rnd))
                 for name in order(args.servers, rnd)]
    if cluster is not None:
        runs += [("nbdcopy-in", "rbd", srv.name, functools.partial(
            copy_in_rbd, srv.name, cluster, image, args.size, workdir, rnd))
                 for srv in order(servers.get("rbd", []), rnd)]
    runs += [("nbdcopy-in", "qcow2", srv.name, functools.partial(
        qcow2jobs.copy_in_qcow2, srv.name, image, args.size, workdir, rnd))
             for srv in order(servers.get("qcow2", []), rnd)]
    return runs


def run_round(rnd: int, args: argparse.Namespace, servers: dict[str, list[Server]],
              image: Path, workdir: Path,
              results: dict[tuple[str, str], dict[str, list[Sample]]],
              cluster: rbdcluster.Cluster | None = None) -> None:
    runs = round_runs(rnd, args, servers, image, workdir, cluster)
    width = max([30, *(len(TITLES[job]) for job, *_ in runs)])
    for job, backend, name, run in runs:
        try:
            sample = run()
        except Exception as err:  # one broken run must not lose the others
            sample = Sample(rnd, False, f"harness error: {err!r}"[:300])
        results.setdefault((job, backend), {}).setdefault(name, []).append(sample)
        cpu = "" if sample.cpu_us is None else f", cpu {sample.cpu_us:.1f}"
        iops = f"{sample.iops:,.0f} IOPS, " if sample.iops else f"{sample.seconds:.1f} s, "
        value = (f"{iops}{sample.mbps:,.0f} MB/s{cpu}" if sample.ok
                 else f"FAILED: {sample.error}")
        print(f"  r{rnd + 1} {TITLES[job]:<{width}} {backend:<7} {name:<10} {value}", flush=True)


def start_cluster(args: argparse.Namespace, image: Path, workdir: Path,
                  stack: contextlib.ExitStack) -> rbdcluster.Cluster:
    """A throwaway Ceph cluster (stopped by ``stack``) holding a copy of ``image``."""
    root = workdir / "ceph"
    stack.callback(rbdcluster.stop, root)  # first, so that a half-started cluster stops too
    t0 = time.monotonic()
    cluster = rbdcluster.start(root, max(8 << 30, 4 * args.size))
    rbdcluster.import_image(cluster, image, RBD_IMAGE, args.size)
    if "nbdcopy-in" in args.jobs:
        # warm-up: the first copy into fresh objects grows the in-memory OSD's heap, and
        # cost whichever server went first 4-5x the OSD CPU of later copies (measured)
        rbdcluster.import_image(cluster, image, "warm-up", args.size)
        rbdcluster.remove_image(cluster, "warm-up", args.size)
    print(f"ceph cluster {cluster.conf} (osd pid {cluster.osd_pid}), image "
          f"{rbdcluster.POOL}/{RBD_IMAGE} imported in {time.monotonic() - t0:.1f} s", flush=True)
    return cluster


def start_all(args: argparse.Namespace, per_backend: dict[str, list[str]], image: Path,
              workdir: Path, stack: contextlib.ExitStack,
              cluster: rbdcluster.Cluster | None = None) -> dict[str, list[Server]]:
    servers: dict[str, list[Server]] = {}
    for name in per_backend.get("qcow2", []):  # before any server locks the raw image
        t0 = time.monotonic()
        qcow2jobs.make_copy(image, qcow2jobs.copy_path(workdir, name), args.size)
        print(f"qcow2 copy for {name} in {time.monotonic() - t0:.1f} s", flush=True)
    for backend, names in per_backend.items():
        for name in names:
            if backend == "rbd":
                assert cluster is not None
                srv = start_server(name, backend, cluster.spec(RBD_IMAGE), args.size,
                                   workdir, f"{name}-{backend}", cluster.osd_pid)
            elif backend == "qcow2":  # its own copy: two writers never share a qcow2 file
                srv = start_server(name, backend, str(qcow2jobs.copy_path(workdir, name)),
                                   args.size, workdir, f"{name}-{backend}")
            else:
                srv = start_server(name, backend, str(image), args.size, workdir,
                                   f"{name}-{backend}")
            stack.callback(stop_server, srv)
            if backend == "memory":  # fill it, so that reads return real data
                done = run_cmd(["nbdcopy", str(image), srv.uri], copy_timeout(args.size))
                if done.returncode != 0:
                    raise RuntimeError(f"cannot fill {name} memory: {done.stderr.strip()}")
            servers.setdefault(backend, []).append(srv)
            print(f"started {name:<10} {backend:<6} pid {srv.pid:<7} {srv.uri}", flush=True)
    return servers


def missing_tools(args: argparse.Namespace) -> list[str]:
    programs = {"qemu-nbd-uring": "qemu-nbd"}  # server names that are not programs
    missing = [t for t in ("fio", "nbdcopy", "nbdinfo", *args.servers)
               if not t.startswith("pynbd") and shutil.which(programs.get(t, t)) is None]
    if "rbd" in args.backends:
        missing += rbdcluster.missing_requirements()
    if "qcow2" in args.backends and shutil.which("qemu-img") is None:
        missing.append("qemu-img")
    return missing


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    baseline = args.baseline.resolve() if args.baseline is not None else None
    set_baseline(baseline)
    missing = missing_tools(args)
    if missing:
        print(f"missing tools: {', '.join(missing)}", file=sys.stderr)
        return 2
    per_backend, expected = plan(args)
    print(f"servers per backend: {per_backend}; jobs: {','.join(args.jobs)}; "
          f"{args.rounds} round(s) x {args.runtime} s; image {args.size / MIB:.0f} MiB")
    extra: dict[str, Any] = {"loadavg_at_start": os.getloadavg(),
                             "environment": environment(args.servers, args.backends,
                                                        baseline)}
    print(f"expected duration: ~{expected / 60:.1f} min; load average now "
          f"{extra['loadavg_at_start'][0]:.2f}" + (" (busy host: expect noisy numbers)"
          if extra["loadavg_at_start"][0] > 0.5 else ""), flush=True)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # stop like Ctrl-C
    interrupted = False
    results: dict[tuple[str, str], dict[str, list[Sample]]] = {}
    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="nbd-bench-", dir=args.tmpdir))
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, workdir, ignore_errors=True)
        image = workdir / "image.raw"
        make_image(image, args.size)
        cluster = start_cluster(args, image, workdir, stack) if "rbd" in per_backend else None
        servers = start_all(args, per_backend, image, workdir, stack, cluster)
        try:
            for rnd in range(args.rounds):
                print(f"round {rnd + 1}/{args.rounds}", flush=True)
                run_round(rnd, args, servers, image, workdir, results, cluster)
                write_json(args, summarize(results), extra)  # keep what we have so far
            if "qcow2" in servers:  # the copies jobs c and e wrote into must be clean too
                extra["qcow2_check"] = qcow2jobs.check_copies(servers["qcow2"], workdir,
                                                              args.size)
                print(f"qemu-img check of each server's qcow2 copy: {extra['qcow2_check']}",
                      flush=True)
        except KeyboardInterrupt:
            print("interrupted: reporting the samples taken so far", flush=True)
            interrupted = True
    elapsed = time.monotonic() - started
    rows = summarize(results)
    print()
    print(format_table(rows, args.servers))
    corrupt = any(v != "clean" for v in extra.get("qcow2_check", {}).values())
    if corrupt:
        print(f"QCOW2 COPY NOT CLEAN after the rounds: {extra['qcow2_check']}")
    extra |= {"elapsed_s": round(elapsed, 1), "loadavg_at_end": os.getloadavg()}
    path = write_json(args, rows, extra)
    print(f"\nresults: {path}; {write_chart(rows, args.out / 'ratios.png')}"
          f"; took {elapsed / 60:.1f} min")
    return 130 if interrupted else 1 if corrupt else 0


if __name__ == "__main__":
    sys.exit(main())
