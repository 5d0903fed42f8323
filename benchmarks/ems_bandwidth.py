"""EMS bandwidth: same-run ratios behind issue 4's performance bars.

Starts one EMS server process on loopback and measures, in the same run:
  1. same-host get (shared-memory fast path) of 4 MB values vs a plain memory copy of the same bytes
     (bar: >= 50%);
  2. loopback TCP get of 4 MB values (bar: >= 1 GB/s);
  3. one batched get of 1,000 keys of 16 KB vs 1,000 single gets (bar: >= 5x, over TCP and over
     shared memory, where a single get needs no round trip either, so the batch must save the
     per-key work).
Each figure is the median of several trials; the trials of the two sides of a ratio alternate, so
both see the same load on a shared machine. Exit status 1 if a bar is missed.

    python benchmarks/ems_bandwidth.py [--values 32] [--trials 5]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from matrixinfer.ems import native  # noqa: E402
from matrixinfer.ems.client import EmsClient  # noqa: E402

MB = 1 << 20


def progress(msg: str) -> None:
    print(f"  ... {msg}", file=sys.stderr, flush=True)


def median_time(fn: Callable[[], None], trials: int) -> float:
    fn()  # warm up: connections, page faults, lazy mappings
    times = []
    for _ in range(trials):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def median_times_interleaved(fns: list[Callable[[], None]], trials: int) -> list[float]:
    """Median time of each of ``fns``, with their trials alternating (one warm-up call each)."""
    for fn in fns:
        fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(trials):
        for fn, ts in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    return [statistics.median(ts) for ts in times]


def _raw_sender(port_q: mp.Queue[int], nbytes: int, count: int) -> None:
    """A bare socket server answering each 1-byte request with the next of ``count`` distinct
    ``nbytes`` buffers (the same working set as the EMS figure): the Python TCP ceiling."""
    srv = socket.create_server(("127.0.0.1", 0))
    rng = np.random.default_rng(1)
    data = [memoryview(rng.integers(0, 255, nbytes, dtype=np.uint8)) for _ in range(count)]
    port_q.put(srv.getsockname()[1])
    conn, _ = srv.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    i = 0
    while conn.recv(1):
        conn.sendall(data[i % count])
        i += 1


def raw_tcp_time(nbytes: int, count: int, trials: int) -> float:
    """Median time to fetch ``count`` messages of ``nbytes`` over a bare loopback socket."""
    q: mp.Queue[int] = mp.Queue()
    proc = mp.Process(target=_raw_sender, args=(q, nbytes, count), daemon=True)
    proc.start()
    sock = socket.create_connection(("127.0.0.1", q.get(timeout=60)))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    out = memoryview(bytearray(nbytes))

    def fetch_all() -> None:
        for _ in range(count):
            sock.send(b"x")
            got = 0
            while got < nbytes:
                got += sock.recv_into(out[got:], nbytes - got)

    try:
        return median_time(fetch_all, trials)
    finally:
        sock.close()
        proc.terminate()


def start_server(capacity: str) -> tuple[subprocess.Popen, str]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "matrixinfer.ems.server", "--capacity", capacity],
                            stdout=subprocess.PIPE, text=True, env=env)
    line = proc.stdout.readline()
    if "listening on" not in line:
        proc.kill()
        raise SystemExit(f"EMS server did not start: {line!r}")
    return proc, line.split()[-1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--values", type=int, default=32, help="number of distinct 4 MB values (default 32)")
    parser.add_argument("--trials", type=int, default=5, help="timed trials per figure (median reported)")
    args = parser.parse_args()
    big, n_small, small = 4 * MB, 1000, 16 << 10
    total_mb = args.values * 4 + n_small * small // MB
    progress(f"starting an EMS server ({total_mb + 64} MB arena)")
    proc, addr = start_server(f"{total_mb + 64}M")
    try:
        shm = EmsClient([addr], namespace="bench", fast_path=True)
        tcp = EmsClient([addr], namespace="bench", fast_path=False)
        assert shm._conn(addr).arena is not None, "same-host fast path unavailable"
        rng = np.random.default_rng(0)
        progress(f"writing {args.values} x 4 MB and {n_small} x 16 KB values")
        bigs = [rng.integers(0, 255, big, dtype=np.uint8) for _ in range(args.values)]
        shm.mput([(f"big{i}", v) for i, v in enumerate(bigs)])
        big_keys = [f"big{i}" for i in range(args.values)]
        small_keys = [f"small{i}" for i in range(n_small)]
        shm.mput([(k, rng.integers(0, 255, small, dtype=np.uint8)) for k in small_keys])
        out = np.empty(big, np.uint8)
        nbytes = big * args.values

        progress("1-2/4 plain memory copy of the same 4 MB values (baseline), same-host get (shared memory)")
        t_copy, t_shm = median_times_interleaved([lambda: [np.copyto(out, v) for v in bigs],
                                                  lambda: [shm.get_into(k, out) for k in big_keys]], args.trials)
        progress("3/4 loopback TCP get of 4 MB values")
        t_tcp = median_time(lambda: [tcp.get_into(k, out) for k in big_keys], args.trials)
        assert np.array_equal(out, bigs[-1])

        progress("3b/4 bare Python loopback socket, same sizes (context for the TCP figure)")
        t_raw = raw_tcp_time(big, args.values, args.trials)
        progress("4/4 1,000 single gets vs one batched get of 16 KB values")
        outs = [np.empty(small, np.uint8) for _ in small_keys]
        ratios = {}
        for name, c in (("tcp", tcp), ("shared memory", shm)):  # c bound per lambda: both run in this iteration
            ratios[name] = median_times_interleaved([lambda c=c: [c.get_into(k, o) for k, o in zip(small_keys, outs)],
                                                     lambda c=c: c.mget(small_keys, outs)], args.trials)
        shm.close()
        tcp.close()
    finally:
        proc.terminate()
        proc.wait()

    copy_gbs, shm_gbs, tcp_gbs, raw_gbs = (nbytes / t / 1e9 for t in (t_copy, t_shm, t_tcp, t_raw))
    checks = []
    print(f"EMS bandwidth ({args.values} x 4 MB values, median of {args.trials} trials, server {addr})")
    print(f"  plain memory copy          {copy_gbs:7.2f} GB/s")
    r = shm_gbs / copy_gbs
    checks.append(r >= 0.5)
    print(f"  same-host get (shm)        {shm_gbs:7.2f} GB/s  = {r:5.0%} of memory copy   (bar >= 50%)  "
          f"{'PASS' if checks[-1] else 'FAIL'}")
    checks.append(tcp_gbs >= 1.0)
    print(f"  loopback TCP get           {tcp_gbs:7.2f} GB/s                          (bar >= 1 GB/s) "
          f"{'PASS' if checks[-1] else 'FAIL'}")
    print(f"  (bare Python loopback socket {raw_gbs:7.2f} GB/s: EMS TCP get = {tcp_gbs / raw_gbs:.0%} of it)")
    for name, (t_single, t_batch) in ratios.items():
        speedup = t_single / t_batch
        checks.append(speedup >= 5)
        print(f"  1,000 x 16 KB gets, {name:<13} single {t_single * 1e3:7.1f} ms, batched {t_batch * 1e3:6.1f} ms"
              f" = {speedup:5.1f}x (bar >= 5x) {'PASS' if checks[-1] else 'FAIL'}")
    helpers = "C helpers" if native.available() else "no C helpers: hashlib, Python copies"
    print(f"  (same-host batched gets: {helpers})")
    return 0 if all(checks) else 1


if __name__ == "__main__":
    sys.exit(main())
