"""The benchmark's report: medians and ratios per (job, backend), the tables, the chart,
the environment and ``results.json``.

Rows are (job, backend) pairs; each has every server's median throughput
(IOPS for 4k jobs, MB/s for 1M jobs and nbdcopy) and server CPU (us per I/O,
or per MiB copied), and pynbd's ratios against the best other server.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import rbdcluster
from procs import run_cmd
from servers import HAS_MEMORY, HAS_RBD, RBD_IMAGE
from workloads import COPY_JOBS, FIO_JOBS, TITLES, Sample, unit_of

if TYPE_CHECKING:
    import argparse

TITLE_WIDTH = 31  # the job column, wider if a title needs it


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def summarize(results: dict[tuple[str, str], dict[str, list[Sample]]]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for (job, backend), per_server in results.items():
        unit = unit_of(job)
        servers: dict[str, Any] = {}
        for name, samples in per_server.items():
            good = [s for s in samples if s.ok]
            thr = [s.iops if unit == "IOPS" else s.mbps for s in good]
            servers[name] = {
                "throughput": _median(thr), "iops": _median([s.iops for s in good]),
                "mbps": _median([s.mbps for s in good]),
                "cpu_us": _median([s.cpu_us for s in good if s.cpu_us is not None]),
                "client_cpu_us": _median([s.client_cpu_us for s in good
                                          if s.client_cpu_us is not None]),
                "foreign_cores": _median([s.foreign_cores for s in good]),
                "failures": [s.error for s in samples if not s.ok],
                "samples": [dataclasses.asdict(s) for s in samples]}
            osd = [s.osd_cpu_us for s in good if s.osd_cpu_us is not None]
            if osd:  # rbd: the OSD's share, and server + OSD
                servers[name]["osd_cpu_us"] = _median(osd)
                servers[name]["cpu_with_osd_us"] = _median(
                    [s.cpu_us + s.osd_cpu_us for s in good
                     if s.cpu_us is not None and s.osd_cpu_us is not None])
        mine = servers.get("pynbd", {})
        others = [v for k, v in servers.items() if k != "pynbd"]
        best_thr = max((v["throughput"] for v in others if v["throughput"]), default=None)
        best_cpu = min((v["cpu_us"] for v in others if v["cpu_us"]), default=None)
        row = {
            "job": job, "title": TITLES[job], "backend": backend, "unit": unit,
            "cpu_unit": "us/MiB" if job in COPY_JOBS else "us/IO", "servers": servers,
            "ratio_throughput": (mine["throughput"] / best_thr
                                 if mine.get("throughput") and best_thr else None),
            "ratio_cpu": (best_cpu / mine["cpu_us"]
                          if mine.get("cpu_us") and best_cpu else None)}
        if any("cpu_with_osd_us" in v for v in servers.values()):
            best_all = min((v["cpu_with_osd_us"] for v in others
                            if v.get("cpu_with_osd_us")), default=None)
            row["ratio_cpu_with_osd"] = (best_all / mine["cpu_with_osd_us"]
                                         if mine.get("cpu_with_osd_us") and best_all else None)
        rows.append(row)
    return rows


def _fmt_thr(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    return f"{value / 1000:.1f}k" if unit == "IOPS" else f"{value:.0f}"


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(rows: list[dict[str, Any]], servers: list[str]) -> str:
    width = max([TITLE_WIDTH, *(len(row["title"]) + 1 for row in rows)])
    head = f"{'job':<{width}}{'backend':<9}{'unit':<5}"
    head += "".join(f"| {name:>10} {'cpu':>7} " for name in servers)
    head += "| pynbd/best  best/pynbd cpu"
    lines = [head, "-" * len(head)]
    for row in rows:
        line = f"{row['title']:<{width}}{row['backend']:<9}{row['unit']:<5}"
        for name in servers:
            cell = row["servers"].get(name)
            if cell is None:
                line += f"| {'n/a':>10} {'':>7} "
                continue
            mark = ("*" if row["job"] == "nbdcopy-in" and row["backend"] == "memory"
                    and name not in HAS_MEMORY else "")
            thr = "FAIL" if cell["throughput"] is None else _fmt_thr(cell["throughput"],
                                                                      row["unit"]) + mark
            line += f"| {thr:>10} {_fmt(cell['cpu_us'], '.1f'):>7} "
        line += (f"| {_fmt(row['ratio_throughput'], '.2f'):>10} "
                 f"{_fmt(row['ratio_cpu'], '.2f'):>15}")
        lines.append(line)
    lines.append("cpu = server CPU us per I/O (fio jobs) or per MiB copied (nbdcopy); "
                 "ratios > 1 mean pynbd is faster / cheaper than the best other server.")
    noise = [x["foreign_cores"] for r in rows for x in r["servers"].values()
             if x["foreign_cores"] is not None]
    if noise:
        lines.append(f"background load (host CPU busy outside server and client, cores): "
                     f"median {statistics.median(noise):.2f}, max {max(noise):.2f} of "
                     f"{os.cpu_count()}" + ("  <- noisy host" if max(noise) > 0.25 else ""))
    if any(r["job"] == "nbdcopy-in" and r["backend"] == "memory" for r in rows):
        lines.append("nbdcopy-in targets: pynbd memory:SIZE, nbdkit memory SIZE; "
                     "* = no memory backend, fresh sparse raw file instead.")
    if any(r["backend"] == "qcow2" for r in rows):
        lines.append("qcow2: each server its own fully allocated copy (qemu-img convert); "
                     "h, i, nbdcopy-in: a fresh empty qcow2 per run, qemu-img check'ed "
                     "after (FAIL if not clean); n/a: no qcow2 support.")
    lines += [f"CORRUPT IMAGE: {r['title']} {r['backend']} {name}: {err}"
              for r in rows for name, cell in r["servers"].items()
              for err in cell["failures"] if "qemu-img check" in err
              or "qemu-img compare" in err]
    if any(r["backend"] == "rbd" for r in rows):
        lines.append("rbd: pynbd and qemu-nbd (--cache=none) on the same RBD image, no "
                     "--discard for either; nbdcopy-in: a fresh image per server and round; "
                     "n/a: no RBD support.")
        lines += ["", osd_table(rows, [n for n in servers if n in HAS_RBD])]
    return "\n".join(lines)


def osd_table(rows: list[dict[str, Any]], servers: list[str]) -> str:
    """rbd rows: each server's CPU, the Ceph OSD's CPU during its runs, and their sum."""
    head = f"{'rbd job':<31}{'cpu unit':<9}"
    head += "".join(f"| {name:>8} {'osd':>7} {'sum':>7} " for name in servers)
    head += "| best/pynbd sum"
    lines = [head, "-" * len(head)]
    for row in rows:
        if row["backend"] != "rbd":
            continue
        line = f"{row['title']:<31}{row['cpu_unit']:<9}"
        for name in servers:
            cell = row["servers"].get(name, {})
            line += (f"| {_fmt(cell.get('cpu_us'), '.1f'):>8} "
                     f"{_fmt(cell.get('osd_cpu_us'), '.1f'):>7} "
                     f"{_fmt(cell.get('cpu_with_osd_us'), '.1f'):>7} ")
        lines.append(line + f"| {_fmt(row.get('ratio_cpu_with_osd'), '.2f'):>14}")
    lines.append("osd = the Ceph OSD's CPU during that server's runs (librbd hands it part "
                 "of the work); sum = server + osd.")
    return "\n".join(lines)


def write_chart(rows: list[dict[str, Any]], path: Path) -> str:
    """Grouped bars of the pynbd ratios per job; returns a note for the report."""
    try:
        mpl: Any = importlib.import_module("matplotlib")
        mpl.use("Agg")
        plt: Any = importlib.import_module("matplotlib.pyplot")
    except ImportError:
        return "matplotlib not installed: no chart"
    backends = sorted({r["backend"] for r in rows})
    jobs = list(dict.fromkeys(r["job"] for r in rows))
    # (label, backend, key) per bar series; rbd's CPU also counted with the OSD's
    thr = [(b, b, "ratio_throughput") for b in backends]
    cpu = [(b, b, "ratio_cpu") for b in backends]
    if any(r.get("ratio_cpu_with_osd") for r in rows):
        cpu.append(("rbd incl. osd", "rbd", "ratio_cpu_with_osd"))
    fig, axes = plt.subplots(2, 1, figsize=(max(8, len(jobs) * 1.1), 8), sharex=True)
    width = 0.8 / max(len(thr), len(cpu), 1)
    for ax, series, label in ((axes[0], thr, "throughput: pynbd / best other"),
                              (axes[1], cpu, "CPU per I/O: best other / pynbd")):
        for i, (name, backend, key) in enumerate(series):
            by_job = {r["job"]: r.get(key) for r in rows if r["backend"] == backend}
            xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(jobs))]
            ax.bar(xs, [by_job.get(job) or 0.0 for job in jobs], width, label=name)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_ylabel(label)
        ax.legend()
    axes[1].set_xticks(list(range(len(jobs))))
    axes[1].set_xticklabels(jobs)
    axes[0].set_title("pynbd vs best of the other NBD servers (>1: pynbd better)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return f"chart: {path}"


def environment(servers: list[str], backends: list[str],
                baseline: Path | None) -> dict[str, Any]:
    def version(cmd: list[str]) -> str:
        try:
            done = run_cmd(cmd, 10)
        except (OSError, subprocess.TimeoutExpired) as err:
            return f"unknown ({err})"
        return ((done.stdout + done.stderr).strip().splitlines() or ["unknown"])[0]

    commands = {"pynbd": [sys.executable, "-m", "pynbd", "-V"], "qemu-nbd": ["qemu-nbd", "-V"],
                "qemu-nbd-uring": ["qemu-nbd", "-V"],
                "pynbd-base": ["git", "-C", str(baseline), "rev-parse", "--short", "HEAD"],
                "nbdkit": ["nbdkit", "--version"], "nbd-server": ["nbd-server", "-V"],
                "fio": ["fio", "--version"], "nbdcopy": ["nbdcopy", "--version"],
                "pynbd-commit": ["git", "-C", str(Path(__file__).resolve().parent.parent),
                                 "rev-parse", "--short", "HEAD"],
                "ceph": ["ceph", "--version"], "qemu-img": ["qemu-img", "--version"]}
    wanted = ({*servers, "fio", "nbdcopy", "pynbd-commit"}
              | ({"ceph"} if "rbd" in backends else set())
              | ({"qemu-img"} if "qcow2" in backends else set()))
    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"kernel": f"{platform.release()} {platform.version()}", "cpu_model": cpu,
            "cpus": os.cpu_count(), "python": platform.python_version(),
            "versions": {k: version(v) for k, v in commands.items() if k in wanted}}


def write_json(args: argparse.Namespace, rows: list[dict[str, Any]],
               extra: dict[str, Any]) -> Path:
    args.out.mkdir(parents=True, exist_ok=True)
    config = {"rounds": args.rounds, "runtime_s": args.runtime, "size": args.size,
              "servers": args.servers, "backends": args.backends, "jobs": args.jobs, **extra}
    doc: dict[str, Any] = {
        "config": config,
        "fio_jobs": [dataclasses.asdict(j) for j in FIO_JOBS],
        "notes": ["all servers on Unix sockets (nbd-server via unixsock in its config)",
                  "nbdcopy-in: qemu-nbd and nbd-server have no memory backend, so they "
                  "get a fresh sparse raw file",
                  "cpu_us: server CPU (utime+stime+cutime+cstime over the process tree) "
                  "per I/O for fio jobs, per MiB for nbdcopy"],
        "rows": rows}
    if "rbd" in args.backends:
        doc["config"]["rbd"] = {
            "cluster": "scripts/ceph-cluster: one mon, one memstore OSD, 127.0.0.1, pool size 1",
            "image": f"{rbdcluster.POOL}/{RBD_IMAGE}, layering only, rbd import of the file "
                     "image; every rbd server exports it",
            "nbdcopy_in": "a fresh image (layering only, same size) per server and round, "
                          "removed after the copy",
            "commands": {"pynbd": "python -m pynbd -t -e 0 -k SOCK rbd:POOL/IMAGE:conf=CONF",
                         "qemu-nbd": "qemu-nbd -f raw --cache=none -e 8 -t -k SOCK "
                                     "rbd:POOL/IMAGE:conf=CONF"},
            "discard": "neither server gets --discard (both ignore trims)"}
        doc["notes"].append("rbd: osd_cpu_us is the Ceph OSD's CPU during the run, per I/O or "
                            "per MiB; cpu_with_osd_us = cpu_us + osd_cpu_us; "
                            "ratio_cpu_with_osd compares those sums")
    if "qcow2" in args.backends:
        doc["config"]["qcow2"] = {
            "image": "each server its own copy: qemu-img convert -f raw -O qcow2 of the raw "
                     "image (default 64 KiB clusters, all allocated: random data), fsynced",
            "commands": {"pynbd": "python -m pynbd -t -e 0 -k SOCK -f qcow2 IMAGE",
                         "qemu-nbd-uring": "GLIBC_TUNABLES=... qemu-nbd -f qcow2 -e 8 -t -k "
                                           "SOCK --cache=writeback --aio=io_uring IMAGE",
                         "qemu-nbd": "qemu-nbd -f qcow2 -e 8 -t -k SOCK --cache=writeback "
                                     "--aio=threads IMAGE"},
            "fresh_jobs": "h, i: every run on a fresh empty image (qemu-img create -f qcow2 "
                          "IMG SIZE) and a server started for it; after the run the server "
                          "stops, qemu-img check must be clean (else the sample fails), the "
                          "image is removed",
            "nbdcopy_in": "into a fresh empty qcow2 per server and round, served by a server "
                          "started for it; qemu-img check and qemu-img compare with the raw "
                          "image after (else the sample fails), removed after",
            "copies_checked_at_end": "each server's copy is qemu-img check'ed after the "
                                     "rounds (config.qcow2_check)"}
    path: Path = args.out / "results.json"
    path.write_text(json.dumps(doc, indent=2) + "\n")
    return path
