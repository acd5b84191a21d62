"""Reliability report: pynbd beside qemu-nbd, nbdkit and nbd-server.

Each server exports its own sparse 256 MiB raw image on a Unix socket in a
private temp dir.  Measures (rows of one table, servers as columns):

1. ``pynbd check --write`` ops/s and violations (plus a "broken control":
   tests/support/broken_server.py with its per-connection cache on, which must
   show violations);
2. PSS added by N idle clients that finished the handshake (summed over the
   process tree), and a busy client's median 4k READ latency with them
   connected over its median alone;
3. seconds until a client that sends nothing is dropped (bounded);
4. peak RSS growth while one client pipelines 48 x 32 MiB WRITEs unread;
5. open fds and RSS growth after N connect/handshake/read/disconnect cycles.

Servers are stopped by pid in a ``finally``; the temp dir is removed.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import resource
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

# the process-tree helpers are bench/procs.py's (this script runs from bench/)
sys.path.insert(0, str(Path(__file__).resolve().parent))
from procs import descendants, stat_fields

ROOT = Path(__file__).resolve().parent.parent
SERVERS = ("pynbd", "qemu-nbd", "nbdkit", "nbd-server")
CONTROL = "broken control"
MIB = 1 << 20
SIZE = 256 * MIB
READY_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0
IO_TIMEOUT = 10.0
NBDMAGIC, IHAVEOPT, REPLY_MAGIC = 0x4E42444D41474943, 0x49484156454F5054, 0x3E889045565A9
REQ_MAGIC, SIMPLE_MAGIC = 0x25609513, 0x67446698
OPT_GO, REP_ACK = 7, 1
CMD_READ, CMD_WRITE, CMD_DISC = 0, 1, 2


@dataclasses.dataclass
class Server:
    name: str
    pid: int
    proc: subprocess.Popen[bytes] | None  # None: nbd-server daemonized itself
    sock: Path
    export: str
    log: Path

    @property
    def uri(self) -> str:
        return f"nbd+unix:///{self.export}?socket={self.sock}"


# -- processes -----------------------------------------------------------------------------

def pid_alive(pid: int) -> bool:
    try:
        return stat_fields(pid)[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def kib_field(path: str, key: str) -> int:
    """A ``Key:  N kB`` field of a /proc file, 0 if the process is gone."""
    with contextlib.suppress(OSError):
        for line in Path(path).read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def tree_kib(pid: int, path: str, key: str) -> int:
    return sum(kib_field(f"/proc/{p}/{path}", key) for p in [pid, *descendants(pid)])


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def server_command(name: str, image: Path, sock: Path, workdir: Path) -> list[str]:
    if name == "pynbd":
        return [sys.executable, "-m", "pynbd", "-t", "-e", "0", "-k", str(sock), str(image)]
    if name == "qemu-nbd":
        return ["qemu-nbd", "-f", "raw", "-e", "0", "-t", "-k", str(sock), str(image)]
    if name == "nbdkit":
        return ["nbdkit", "-f", "-U", str(sock), "file", str(image)]
    if name == "nbd-server":
        config = workdir / "nbd-server.conf"
        config.write_text(f"[generic]\nunixsock = {sock}\n"
                          f"[bench]\nexportname = {image}\nreadonly = false\n"
                          # advertise FLUSH, FUA and TRIM as the others do, so that the
                          # checker sends nbd-server the same mix of commands
                          "flush = true\nfua = true\ntrim = true\n")
        return ["nbd-server", "-C", str(config), "-p", str(workdir / "nbd-server.pid")]
    return [sys.executable, str(ROOT / "tests/support/broken_server.py"), "--socket",
            str(sock), "--size", "16M", "--cache", "on"]


def start_server(name: str, workdir: Path) -> Server:
    tag = name.replace(" ", "-")
    sock, log, image = workdir / f"{tag}.sock", workdir / f"{tag}.log", workdir / f"{tag}.img"
    if name != CONTROL:
        with image.open("wb") as fh:
            fh.truncate(SIZE)
    with log.open("wb") as fh:
        proc = subprocess.Popen(server_command(name, image, sock, workdir),
                                stdin=subprocess.DEVNULL, stdout=fh, stderr=fh,
                                start_new_session=True)
    server = Server(name, proc.pid, proc, sock, "bench" if name == "nbd-server" else "", log)
    try:
        if name == "nbd-server":  # the launcher exits, the daemon writes its pid
            if proc.wait(timeout=READY_TIMEOUT) != 0:
                raise RuntimeError(f"nbd-server failed: {log.read_text(errors='replace')}")
            server.proc, server.pid = None, read_pid(workdir / "nbd-server.pid")
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline and pid_alive(server.pid):
            with contextlib.suppress(subprocess.TimeoutExpired):
                probe = subprocess.run(["nbdinfo", "--size", server.uri], check=False,
                                       capture_output=True, text=True, timeout=5)
                if probe.returncode == 0:
                    return server
            time.sleep(0.1)
        raise RuntimeError(f"{name} not ready: {log.read_text(errors='replace')[-1000:]}")
    except BaseException:
        stop_server(server)
        raise


def read_pid(path: Path) -> int:
    for _ in range(int(READY_TIMEOUT / 0.05)):  # the daemon writes it after the fork
        with contextlib.suppress(OSError, ValueError, IndexError):
            return int(path.read_text().split()[0])
        time.sleep(0.05)
    raise RuntimeError(f"no pid file {path}")


def stop_server(server: Server) -> None:
    """SIGTERM the server and its descendants by pid, SIGKILL after a bound."""
    for pid in [server.pid, *descendants(server.pid)]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT
    while pid_alive(server.pid) and time.monotonic() < deadline:
        time.sleep(0.05)  # a Popen child that exited is a zombie until waited for: not alive
    for pid in [server.pid, *descendants(server.pid)]:
        if pid_alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    if server.proc is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.proc.wait(timeout=STOP_TIMEOUT)


def settle(server: Server, seconds: float = 5.0) -> None:
    """Wait (bounded) until forked per-client children have gone."""
    deadline = time.monotonic() + seconds
    while descendants(server.pid) and time.monotonic() < deadline:
        time.sleep(0.05)


# -- a raw NBD client ----------------------------------------------------------------------

def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            raise ConnectionError("server closed the connection")
        buf += chunk
    return bytes(buf)


def connect(server: Server, timeout: float = IO_TIMEOUT) -> socket.socket:
    """Connect and finish the fixed-newstyle handshake with NBD_OPT_GO."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(str(server.sock))
        magic, opt, _flags = struct.unpack(">QQH", recv_exact(sock, 18))
        if (magic, opt) != (NBDMAGIC, IHAVEOPT):
            raise ConnectionError("not a newstyle server")
        sock.sendall(struct.pack(">I", 3))  # FIXED_NEWSTYLE | NO_ZEROES
        name = server.export.encode()
        data = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
        sock.sendall(struct.pack(">QII", IHAVEOPT, OPT_GO, len(data)) + data)
        for _ in range(64):
            magic, _opt, rtype, length = struct.unpack(">QIII", recv_exact(sock, 20))
            recv_exact(sock, length)
            if magic != REPLY_MAGIC or rtype & 0x80000000:
                raise ConnectionError(f"NBD_OPT_GO refused (reply type {rtype:#x})")
            if rtype == REP_ACK:
                return sock
        raise ConnectionError("no NBD_REP_ACK")
    except BaseException:
        sock.close()
        raise


def request(sock: socket.socket, cmd: int, handle: int, offset: int, length: int) -> None:
    sock.sendall(struct.pack(">IHHQQI", REQ_MAGIC, 0, cmd, handle, offset, length))


def reply(sock: socket.socket, data_len: int = 0) -> None:
    magic, error, _handle = struct.unpack(">IIQ", recv_exact(sock, 16))
    if magic != SIMPLE_MAGIC or error:
        raise ConnectionError(f"bad reply magic {magic:#x} error {error}")
    recv_exact(sock, data_len)


def read_latencies(server: Server, count: int) -> list[float]:
    with connect(server) as sock:
        times = []
        for i in range(count):
            t0 = time.perf_counter()
            request(sock, CMD_READ, i, (i * 4096) % SIZE, 4096)
            reply(sock, 4096)
            times.append(time.perf_counter() - t0)
        request(sock, CMD_DISC, 0, 0, 0)
        return times


# -- measures ------------------------------------------------------------------------------

def run_check(server: Server, seconds: float) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "pynbd", "check", server.uri, "--write", "--seconds",
           str(seconds), "--connections", "4", "--json"]
    for forced in (False, True):  # --force only if the export lacks multi-conn
        done = subprocess.run([*cmd, "--force"] if forced else cmd, check=False,
                              capture_output=True, text=True, timeout=seconds + 60)
        if done.returncode != 2 or "multi" not in done.stderr.lower():
            break
    try:
        result: dict[str, Any] = json.loads(done.stdout)
    except ValueError:
        return {"error": f"exit {done.returncode}: {done.stderr.strip()[-300:]}"}
    return {"ops_per_second": result["ops_per_second"],
            "violations": result["violation_count"], "errors": result["errors"][:3],
            "forced": forced}


def idle_clients(server: Server, count: int, busy_reads: int) -> dict[str, Any]:
    alone = statistics.median(read_latencies(server, busy_reads))
    pss0 = tree_kib(server.pid, "smaps_rollup", "Pss")
    socks: list[socket.socket] = []
    error, deadline = "", time.monotonic() + 180
    try:
        while len(socks) < count and time.monotonic() < deadline:
            try:
                socks.append(connect(server))
            except OSError as err:
                error = f"client {len(socks) + 1}: {err!r}"
                break
        time.sleep(0.5)
        pss1 = tree_kib(server.pid, "smaps_rollup", "Pss")
        busy = statistics.median(read_latencies(server, busy_reads))
    finally:
        for sock in socks:
            sock.close()
    settle(server)
    return {"connected": len(socks), "pss_added_mib": (pss1 - pss0) / 1024,
            "latency_alone_us": alone * 1e6, "latency_busy_us": busy * 1e6,
            "latency_ratio": busy / alone, "error": error}


def silent_client(server: Server, bound: float = 15.0) -> float | None:
    """Seconds until the server drops a client that sends nothing, None if over ``bound``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(str(server.sock))
        t0 = time.monotonic()
        while (left := bound - (time.monotonic() - t0)) > 0:
            sock.settimeout(left)
            try:
                if not sock.recv(4096):
                    return time.monotonic() - t0
            except TimeoutError:
                return None
            except OSError:
                return time.monotonic() - t0
    return None


def pipelined_writes(server: Server, count: int = 48, size: int = 32 * MIB) -> dict[str, Any]:
    payload, sent, sock = bytes(size), [0], connect(server)
    rss0 = peak = tree_kib(server.pid, "status", "VmRSS")
    sock.settimeout(60)

    def send() -> None:
        with contextlib.suppress(OSError):
            for i in range(count):
                request(sock, CMD_WRITE, i, (i * size) % SIZE, size)
                sock.sendall(payload)
                sent[0] += 1

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while thread.is_alive() and time.monotonic() < deadline:
        peak = max(peak, tree_kib(server.pid, "status", "VmRSS"))
        time.sleep(0.05)
    replies = 0
    try:
        if thread.is_alive():  # still blocked after 60 s: give up on this connection
            sock.shutdown(socket.SHUT_RDWR)
        sock.settimeout(30)
        for _ in range(sent[0]):
            reply(sock)
            replies += 1
            peak = max(peak, tree_kib(server.pid, "status", "VmRSS"))
    except OSError:
        pass
    thread.join(5)
    sock.close()
    settle(server)
    return {"sent": sent[0], "replies": replies, "peak_rss_growth_mib": (peak - rss0) / 1024,
            "vmhwm_mib": kib_field(f"/proc/{server.pid}/status", "VmHWM") / 1024}


def cycles(server: Server, count: int, warmup: int = 50) -> dict[str, Any]:
    """fd and RSS growth of the (parent) process over ``count`` short connections."""
    def rss() -> int:
        return kib_field(f"/proc/{server.pid}/status", "VmRSS")
    done, error, fds0, rss0 = 0, "", fd_count(server.pid), rss()
    deadline = time.monotonic() + 300
    for i in range(warmup + count):
        if i == warmup:  # baseline after a warm-up, once the server is quiet
            settle(server)
            time.sleep(0.5)
            fds0, rss0 = fd_count(server.pid), rss()
        if time.monotonic() > deadline:
            break
        try:
            with connect(server) as sock:
                request(sock, CMD_READ, 1, (i * 4096) % SIZE, 4096)
                reply(sock, 4096)
                request(sock, CMD_DISC, 2, 0, 0)
            done += i >= warmup
        except OSError as err:
            error = f"cycle {i + 1 - warmup}: {err!r}"
            break
    settle(server)
    time.sleep(0.5)
    return {"cycles": done, "fd_growth": fd_count(server.pid) - fds0,
            "rss_growth_mib": (rss() - rss0) / 1024, "error": error}


# -- report --------------------------------------------------------------------------------

def measure_server(name: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    server = start_server(name, workdir)
    out: dict[str, Any] = {"pid": server.pid}
    try:
        print(f"{name}: pid {server.pid} {server.uri}", flush=True)
        steps: list[tuple[str, Any]] = [("check", lambda: run_check(server, args.seconds))]
        if name != CONTROL:
            steps += [("idle", lambda: idle_clients(server, args.idle, args.busy_reads)),
                      ("silent_drop_s", lambda: silent_client(server)),
                      ("cycles", lambda: cycles(server, args.cycles)),
                      ("pipelined_writes", lambda: pipelined_writes(server))]
        for key, step in steps:
            t0 = time.monotonic()
            try:
                out[key] = step()
            except Exception as err:  # one failed measure must not lose the others
                out[key] = {"error": repr(err)[:300]}
            print(f"  {key}: {out[key]} ({time.monotonic() - t0:.1f} s)", flush=True)
            if not pid_alive(server.pid):
                out[key + "_server_died"] = True
                print(f"  {name} died", flush=True)
                break
    finally:
        stop_server(server)
    return out


def cell(data: dict[str, Any], key: str, field: str | None, fmt: str) -> str:
    value = data.get(key)
    if field is not None:
        if not isinstance(value, dict):
            return "-"
        if field not in value:
            return "ERR" if "error" in value else "-"
        value = value[field]
    if key == "silent_drop_s" and value is None and key in data:
        return ">15"
    if value is None:
        return "-"
    return format(value, fmt)


def table(results: dict[str, dict[str, Any]], args: argparse.Namespace) -> tuple[str, Any]:
    rows = [
        ("check ops/s", "check", "ops_per_second", ",.0f"),
        ("check violations", "check", "violations", "d"),
        (f"PSS added by {args.idle} idle clients (MiB)", "idle", "pss_added_mib", ".1f"),
        ("idle clients connected", "idle", "connected", "d"),
        ("busy 4k read median latency alone (us)", "idle", "latency_alone_us", ".0f"),
        ("busy latency with idle / alone", "idle", "latency_ratio", ".2f"),
        ("silent client dropped after (s)", "silent_drop_s", None, ".1f"),
        ("48x32M pipelined writes: peak RSS growth (MiB)", "pipelined_writes",
         "peak_rss_growth_mib", ".0f"),
        ("48x32M pipelined writes: replies read", "pipelined_writes", "replies", "d"),
        (f"fd growth after {args.cycles} cycles", "cycles", "fd_growth", "d"),
        (f"RSS growth after {args.cycles} cycles (MiB)", "cycles", "rss_growth_mib", ".1f"),
    ]
    names = list(results)
    width = max(len(r[0]) for r in rows)
    lines = [f"{'measure':<{width}} " + " ".join(f"{n:>14}" for n in names)]
    doc: list[dict[str, Any]] = []
    for title, key, field, fmt in rows:
        cells = {n: cell(results[n], key, field, fmt) for n in names}
        lines.append(f"{title:<{width}} " + " ".join(f"{cells[n]:>14}" for n in names))
        doc.append({"measure": title, **cells})
    forced = [n for n in names if isinstance(results[n].get("check"), dict)
              and results[n]["check"].get("forced")]
    if forced:
        lines.append(f"(check run with --force, no multi-conn advertised: {', '.join(forced)})")
    return "\n".join(lines), doc


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true",
                   help="200 idle clients, 1,000 cycles, 2 s checker")
    p.add_argument("--servers", default=",".join(SERVERS),
                   help="comma-separated subset of " + ",".join(SERVERS))
    p.add_argument("--no-control", action="store_true", help="skip the broken control")
    p.add_argument("--out", type=Path,
                   default=Path(__file__).resolve().parent / "results" / "reliability.json")
    p.add_argument("--tmpdir", help="where images and sockets go (default: system temp)")
    args = p.parse_args(argv)
    args.servers = [s for s in SERVERS if s in args.servers.split(",")]
    args.idle, args.cycles, args.seconds = (200, 1000, 2.0) if args.quick else (1000, 10_000, 5.0)
    args.busy_reads = 500
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    missing = [t for t in ("nbdinfo", *args.servers) if t != "pynbd" and not shutil.which(t)]
    if missing:
        print(f"missing tools: {', '.join(missing)}", file=sys.stderr)
        return 2
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)  # servers inherit it too
    want = hard if hard == resource.RLIM_INFINITY else min(hard, 65536)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, want), hard))
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    results: dict[str, dict[str, Any]] = {}
    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="nbd-reliability-", dir=args.tmpdir))
    try:
        for name in [*args.servers, *([] if args.no_control else [CONTROL])]:
            try:
                results[name] = measure_server(name, args, workdir)
            except Exception as err:
                results[name] = {"error": repr(err)[:300]}
                print(f"{name}: FAILED {err!r}", flush=True)
            for leftover in workdir.glob("*.img"):
                leftover.unlink()
    except KeyboardInterrupt:
        print("interrupted: reporting what was measured", flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    text, rows = table(results, args)
    print()
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "config": {"quick": args.quick, "idle_clients": args.idle, "cycles": args.cycles,
                   "check_seconds": args.seconds, "busy_reads": args.busy_reads,
                   "image_size": SIZE, "elapsed_s": round(time.monotonic() - started, 1)},
        "table": rows, "raw": results}, indent=2) + "\n")
    print(f"\nresults: {args.out}; took {(time.monotonic() - started) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
