"""Two-microbatch overlap at EP 2 over an emulated link, same run: decode and prefill step time
with ``--microbatches 2`` against ``--microbatches 1``, and against ``2-serial`` (the same cut and
collectives with the turns switched off: microbatch 0 runs to its end before 1 starts; the
control that isolates the overlap from the cut).

The link. The two ranks run in two network namespaces joined by a userspace wire: a TUN device in
each namespace, and a forwarder process (``--wire``) that reads each packet one device sends,
serialises it at ``--rate-mbit`` (FIFO: a packet departs when the one before it has, plus its
bytes at the rate) and writes it to the other device ``--delay-ms`` after it departed. Both
directions are shaped alike and independently, and every dispatch, combine and control message
crosses the wire. Before the ranks start, a probe measures what the wire does (round trip of one
byte; time of 1 MiB one way) and the output prints both. This kernel has no ``sch_netem``, so
``tc`` cannot add the delay; the forwarder runs at nice -10 so that the machine's load delays its
packets less.

What the overlap adds, measured in one process first (no link): the cost of one hand-over of the
turn between the microbatches' threads and of a run's start and end, and the cost of the cut
itself (one forward pass of a whole batch against its two halves run one after the other:
prompts cut between whole sequences, one prompt of as many tokens cut inside, a decode batch).

The instances. Rank 1 is ``python -m matrixinfer.parallel.rank`` in the second namespace; rank 0
is this script again (``--driver``) in the first, stepping the instance's engine (the
:class:`~matrixinfer.parallel.dp_engine.DPEngine` that serves). One instance per setting runs at
once (the idle ones' ranks wait in a collective); their timed blocks of ``--steps`` steps
alternate (order reversed every other block), so adjacent blocks share the machine's load. Per
phase, the summary line gives the median per-block ratio of step times with its quartiles and
range. Demo model, float32, fp32 dispatch, one torch thread per rank.

    sudo python benchmarks/ep_overlap.py [--rate-mbit 100] [--delay-ms 0.2] [--blocks 16]

Needs root (network namespaces, /dev/net/tun) and iproute2.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import fcntl
import json
import os
import select
import socket
import statistics
import struct
import subprocess
import sys
import time
from collections import deque
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SETTINGS = ("1", "2", "2-serial")  # --microbatches 1; 2; 2 with TurnScheduler.overlap off (the control)
RANK1 = "import sys; from matrixinfer.parallel.rank import main; sys.exit(main(sys.argv[1:]))"
RANK1_SERIAL = ("import sys; from matrixinfer.parallel.microbatch import TurnScheduler; TurnScheduler.overlap = False; "
                "from matrixinfer.parallel.rank import main; sys.exit(main(sys.argv[1:]))")
ADDR = ("10.204.0.1", "10.204.0.2")
PORT = 29631
PROBE_PORT = 29629
MTU = 65000  # large packets: the forwarder handles a few thousand per second at most
TUNSETIFF, IFF_TUN, IFF_NO_PI, CLONE_NEWNET = 0x400454CA, 0x0001, 0x1000, 0x40000000


# -- the link ----------------------------------------------------------------------------------
def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=20)


def _open_tun(ns: str, name: str) -> int:
    """A TUN device ``name`` created in namespace ``ns`` (this process enters it; the device
    lives as long as the returned descriptor)."""
    libc = ctypes.CDLL(None, use_errno=True)
    with open(f"/var/run/netns/{ns}") as f:
        if libc.setns(f.fileno(), CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {ns}")
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
    return fd


def wire(ns: list[str], devs: list[str], rate_bps: float, delay_s: float) -> None:
    """The forwarder: packets read from one device go to the other, serialised at ``rate_bps``
    and delayed by ``delay_s`` after departure (each direction its own FIFO). Ends when stdin closes."""
    os.nice(-10)
    fds = [_open_tun(n, d) for n, d in zip(ns, devs)]
    print("ready", flush=True)
    queues: list[deque[tuple[float, bytes]]] = [deque(), deque()]
    free = [0.0, 0.0]  # when each direction's serialiser is free
    stdin = sys.stdin.fileno()
    while True:
        now = time.monotonic()
        timeout = None
        for d, q in enumerate(queues):
            while q and q[0][0] <= now:
                try:
                    os.write(fds[1 - d], q.popleft()[1])
                except OSError:  # the far device is down (not yet configured): the packet is lost
                    pass
            if q:
                timeout = min(timeout if timeout is not None else 1.0, q[0][0] - now)
        ready, _, _ = select.select([*fds, stdin], [], [], timeout)
        if stdin in ready and not os.read(stdin, 4096):
            return
        now = time.monotonic()
        for d, fd in enumerate(fds):
            while fd in ready:
                try:
                    pkt = os.read(fd, 1 << 16)
                except BlockingIOError:
                    break
                free[d] = max(now, free[d]) + len(pkt) * 8 / rate_bps
                queues[d].append((free[d] + delay_s, pkt))


class DelayLine:
    """Two namespaces joined by the userspace wire (:func:`wire`), addresses :data:`ADDR`."""

    def __init__(self, rate_mbit: float, delay_ms: float) -> None:
        tag = f"mio{os.getpid() % 100000}"
        self.ns = [f"{tag}a", f"{tag}b"]
        self.dev = [f"{tag}ta", f"{tag}tb"]
        self.rate_mbit, self.delay_ms = rate_mbit, delay_ms
        self.proc: subprocess.Popen | None = None
        for ns in self.ns:
            _ip("netns", "add", ns)
        try:
            self.proc = subprocess.Popen([sys.executable, __file__, "--wire", *self.ns, *self.dev, "--rate-mbit",
                                          str(rate_mbit), "--delay-ms", str(delay_ms)],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            assert self.proc.stdout is not None
            if self.proc.stdout.readline().strip() != "ready":
                raise RuntimeError("the wire forwarder did not start")
            for ns, dev, addr in zip(self.ns, self.dev, ADDR):
                _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
                _ip("-n", ns, "link", "set", dev, "mtu", str(MTU), "up")
                _ip("-n", ns, "link", "set", "lo", "up")
        except BaseException:
            self.close()
            raise

    def describe(self) -> str:
        return (f"userspace wire between two network namespaces (TUN devices, MTU {MTU}): each direction "
                f"serialised at {self.rate_mbit:g} Mbit/s, then delayed {self.delay_ms:g} ms")

    def exec(self, side: int, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.ns[side], *argv]

    def probe(self) -> str:
        """Measure the wire: round trip of one byte (median of 20) and 1 MiB one way (best of 3)."""
        server = subprocess.Popen(self.exec(1, [sys.executable, __file__, "--probe-serve"]), stdout=subprocess.PIPE,
                                  text=True)
        try:
            assert server.stdout is not None
            server.stdout.readline()  # listening
            out = subprocess.run(self.exec(0, [sys.executable, __file__, "--probe"]), capture_output=True, text=True,
                                 check=True, timeout=60).stdout
        finally:
            server.kill()
            server.wait()
        r = json.loads(out)
        mbit = 8 * (1 << 20) / (r["mib_s"] - r["rtt_s"] / 2) / 1e6
        return (f"measured: round trip {1e3 * r['rtt_s']:.2f} ms (1 byte, median of 20), 1 MiB one way in "
                f"{1e3 * r['mib_s']:.1f} ms ({mbit:.0f} Mbit/s after the delay)")

    def close(self) -> None:
        for ns in self.ns:
            for pid in _ip("netns", "pids", ns, check=False).stdout.split():
                try:
                    os.kill(int(pid), 9)
                except (ProcessLookupError, ValueError):
                    pass
        if self.proc is not None and self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        for ns in self.ns:
            _ip("netns", "del", ns, check=False)


def probe_serve() -> None:
    """Answer each length-prefixed message with one byte (the probe's far end)."""
    with socket.create_server((ADDR[1], PROBE_PORT)) as srv:
        print("listening", flush=True)
        conn, _ = srv.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        while len(head := conn.recv(8, socket.MSG_WAITALL)) == 8:
            left = int.from_bytes(head, "little")
            while left:
                left -= len(conn.recv(min(left, 1 << 20)))
            conn.sendall(b"k")


def probe() -> None:
    conn = socket.create_connection((ADDR[1], PROBE_PORT), timeout=30)
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def send(n: int) -> float:
        t0 = time.perf_counter()
        conn.sendall(n.to_bytes(8, "little") + bytes(n))
        conn.recv(1)
        return time.perf_counter() - t0

    rtt = statistics.median(send(1) for _ in range(20))
    print(json.dumps({"rtt_s": rtt, "mib_s": min(send(1 << 20) for _ in range(3)) - rtt / 2}))


# -- what the overlap adds, in one process --------------------------------------------------------
def handoff_cost(n: int = 2000, runs: int = 500) -> tuple[float, float]:
    """Microseconds per hand-over of the turn between two microbatches that do nothing else, and
    per :meth:`TurnScheduler.run` of two empty microbatches (its start and end hand-overs)."""
    from matrixinfer.parallel.microbatch import TurnScheduler

    turns = TurnScheduler(2)

    def mb() -> None:
        for _ in range(n):
            turns.pause()

    try:
        t0 = time.perf_counter()
        turns.run([mb, mb])
        switch = (time.perf_counter() - t0) / turns.switches
        t0 = time.perf_counter()
        for _ in range(runs):
            turns.run([lambda: None, lambda: None])
        run = (time.perf_counter() - t0) / runs
    finally:
        turns.close()
    return 1e6 * switch, 1e6 * run


def cut_cost(a: argparse.Namespace, reps: int = 9) -> dict[str, tuple[float, float, float]]:
    """(whole batch ms, two halves one after the other ms, median of the per-repetition ratios
    halves / whole) for the benchmark's prefill batch cut between whole sequences, one prompt of
    the same tokens cut inside, and the decode batch; the demo model in this process (every expert
    local, the MoE layers op by op as under EP). Whole and halves alternate, each pair a ratio."""
    import torch

    from matrixinfer.model.attention import AttentionMetadata, PagedLatentCache
    from matrixinfer.model.default_model import default_model_path
    from matrixinfer.model.loader import load_model
    from matrixinfer.model.moe import MoE
    from matrixinfer.parallel.microbatch import split_batch

    torch.set_num_threads(1)
    model = load_model(default_model_path(), dtype=torch.float32, device="cpu")
    for layer in model.model.layers:  # as enable_expert_parallel does: MoE layers run op by op under EP
        if isinstance(layer.mlp, MoE):
            layer.native = None  # type: ignore[assignment]
    cfg, block = model.config, 16
    per = a.prefill_tokens // a.prefill_prompts
    shapes = {"prefill, cut between prompts": ([per] * a.prefill_prompts, [0] * a.prefill_prompts),
              "prefill, one prompt cut inside": ([per * a.prefill_prompts], [0]),
              "decode": ([1] * a.decode_batch, [a.prompt_tokens + 8] * a.decode_batch)}
    out = {}
    for name, (q, cached) in shapes.items():
        ctx = [x + c for x, c in zip(q, cached)]
        width = max(-(-c // block) for c in ctx)
        tables = torch.arange(len(ctx) * width, dtype=torch.int32).view(len(ctx), width)
        cache = PagedLatentCache(model.num_cache_layers, len(ctx) * width, block, cfg.kv_cache_dim)
        ids = torch.randint(2, cfg.vocab_size, (sum(q),))
        pos = torch.cat([torch.arange(c, c + x) for x, c in zip(q, cached)])
        meta = AttentionMetadata.build(q, ctx, tables, block)
        split = split_batch(meta)
        assert split is not None
        n = split.tokens
        whole, halves = [], []
        with torch.inference_mode():
            for _ in range(reps):
                t0 = time.perf_counter()
                model(ids, pos, AttentionMetadata.build(q, ctx, tables, block), cache)
                whole.append(time.perf_counter() - t0)
                split = split_batch(AttentionMetadata.build(q, ctx, tables, block))  # fresh metadata, as a step has
                assert split is not None
                t0 = time.perf_counter()
                model(ids[:n], pos[:n], split.first, cache)
                model(ids[n:], pos[n:], split.second, cache)
                halves.append(time.perf_counter() - t0)
        out[name] = (1e3 * statistics.median(whole), 1e3 * statistics.median(halves),
                     statistics.median(h / w for h, w in zip(halves, whole)))
    return out


# -- the EP instances ---------------------------------------------------------------------------
def _config(a: argparse.Namespace, microbatches: int):
    from matrixinfer.config import EngineConfig

    return EngineConfig(device="cpu", dtype="float32", ep=2, nnodes=2, master_addr=ADDR[0], master_port=PORT,
                        microbatches=microbatches, max_num_seqs=max(a.decode_batch, a.prefill_prompts),
                        max_num_batched_tokens=max(a.prefill_tokens, a.decode_batch * a.prompt_tokens),
                        kv_cache_memory=256 << 20, enable_prefix_caching=False, ep_timeout=60)


def _timed_steps(engine, n: int) -> list[float]:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t0)
    return times


def driver(a: argparse.Namespace) -> None:
    """Rank 0 of one instance: start it, then obey the coordinator's lines on stdin (``decode K``,
    ``prefill K``: time K steps of that kind; the first of each kind sets its requests up), one
    JSON line per command: the step times and rank 0's seconds inside dispatch and combine."""
    import torch

    from matrixinfer.engine.sampling_params import SamplingParams
    from matrixinfer.parallel.launch import start_instance
    from matrixinfer.parallel.microbatch import TurnScheduler

    TurnScheduler.overlap = not a.serial
    cfg = dataclasses.replace(_config(a, a.microbatches), node_rank=0, master_port=a.port)
    inst = start_instance(cfg)
    eng, group = inst.engine, inst.engine.group
    vocab = eng.runner.model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    warm, total = 3, a.steps * a.blocks
    per = a.prefill_tokens // a.prefill_prompts
    phase = None
    try:
        for line in sys.stdin:
            kind, n = line.split()
            if kind != phase and kind == "decode":  # decode_batch sequences per rank, their prompts prefilled
                params = SamplingParams(temperature=0, max_tokens=warm + total + 4, ignore_eos=True)
                for i in range(2 * a.decode_batch):
                    eng.add_request(f"d{i}", torch.randint(2, vocab, (a.prompt_tokens,), generator=g).tolist(),
                                    params)
                while eng.stats().generation_tokens < 2 * a.decode_batch:
                    eng.step()
                _timed_steps(eng, warm)
            elif kind != phase and kind == "prefill":  # prefill_prompts prompts per rank per step
                while eng.has_work():
                    eng.step()
                params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
                for i in range(2 * a.prefill_prompts * (warm + total)):
                    eng.add_request(f"p{i}", torch.randint(2, vocab, (per,), generator=g).tolist(), params)
                _timed_steps(eng, warm)
            phase = kind
            comm = group.dispatch_s + group.combine_s
            times = _timed_steps(eng, int(n))
            print(json.dumps({"times": times, "comm": group.dispatch_s + group.combine_s - comm}), flush=True)
        turns = group.turns
        print(json.dumps({"turn_switches": turns.switches if turns is not None else 0,
                          "forward_passes": turns.runs if turns is not None else 0}), flush=True)
    finally:
        inst.close()


class Instance:
    """One EP 2 instance over the link: rank 1 in the second namespace, the driver (rank 0) in
    the first, taking commands on a pipe."""

    def __init__(self, link: DelayLine, a: argparse.Namespace, setting: str, port: int, log_dir: Path) -> None:
        from matrixinfer.cli_args import to_argv

        env = dict(os.environ, PYTHONPATH=str(REPO), MATRIXINFER_THREADS="1", OMP_NUM_THREADS="1")
        microbatches, serial = int(setting[0]), setting.endswith("serial")
        cfg = dataclasses.replace(_config(a, microbatches), node_rank=1, master_port=port)
        rank_env = dict(env, RANK="1", LOCAL_RANK="0", WORLD_SIZE="2", MASTER_ADDR=ADDR[0], MASTER_PORT=str(port),
                        GLOO_SOCKET_IFNAME=link.dev[1])
        self.setting = setting
        self.logs = [open(log_dir / f"rank{r}-{setting}.log", "w") for r in (0, 1)]  # noqa: SIM115 - closed in close()
        rank1 = [sys.executable, "-c", RANK1_SERIAL if serial else RANK1, *to_argv(cfg)]
        self.rank1 = subprocess.Popen(link.exec(1, rank1),
                                      env=rank_env, stdout=self.logs[1], stderr=subprocess.STDOUT, cwd=REPO)
        argv = [sys.executable, str(Path(__file__).resolve()), "--driver", "--microbatches", str(microbatches),
                "--port", str(port), *a.forward, *(["--serial"] if serial else [])]
        self.rank0 = subprocess.Popen(link.exec(0, argv), env=dict(env, GLOO_SOCKET_IFNAME=link.dev[0]), cwd=REPO,
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.logs[0], text=True)

    def command(self, line: str) -> dict:
        assert self.rank0.stdin is not None and self.rank0.stdout is not None
        self.rank0.stdin.write(line + "\n")
        self.rank0.stdin.flush()
        out = self.rank0.stdout.readline()
        if not out:
            raise RuntimeError(f"{self.setting}: the driver ended (see {self.logs[0].name})")
        return json.loads(out)

    def close(self) -> dict:
        last: list[str] = []
        if self.rank0.stdin is not None and self.rank0.stdout is not None and self.rank0.poll() is None:
            self.rank0.stdin.close()
            last = self.rank0.stdout.read().strip().splitlines()
        for proc in (self.rank0, self.rank1):
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        for f in self.logs:
            f.close()
        return json.loads(last[-1]) if last else {}


def _spread(ratios: list[float]) -> str:
    q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
    return (f"{statistics.median(ratios):.3f}x (quartiles {q[0]:.3f}-{q[2]:.3f}, range {min(ratios):.2f}-"
            f"{max(ratios):.2f}, {sum(r > 1 for r in ratios)}/{len(ratios)} blocks > 1)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rate-mbit", type=float, default=100.0, help="link rate per direction, Mbit/s")
    p.add_argument("--delay-ms", type=float, default=0.2, help="one-way delay per direction, ms")
    p.add_argument("--decode-batch", type=int, default=64, help="decoding sequences per rank")
    p.add_argument("--prompt-tokens", type=int, default=8, help="prompt length of the decode requests")
    p.add_argument("--prefill-tokens", type=int, default=512, help="prompt tokens per rank per prefill step")
    p.add_argument("--prefill-prompts", type=int, default=4, help="prompts per rank per prefill step")
    p.add_argument("--steps", type=int, default=3, help="steps per timed block")
    p.add_argument("--blocks", type=int, default=16, help="timed blocks per setting and phase (alternating)")
    p.add_argument("--driver", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--wire", nargs=4, help=argparse.SUPPRESS)
    p.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--probe-serve", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--microbatches", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=PORT, help=argparse.SUPPRESS)
    p.add_argument("--serial", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    a.forward = ["--decode-batch", str(a.decode_batch), "--prompt-tokens", str(a.prompt_tokens),
                 "--prefill-tokens", str(a.prefill_tokens), "--prefill-prompts", str(a.prefill_prompts),
                 "--steps", str(a.steps), "--blocks", str(a.blocks)]
    if a.wire:
        return wire(a.wire[:2], a.wire[2:], a.rate_mbit * 1e6, a.delay_ms / 1e3)
    if a.probe or a.probe_serve:
        return probe() if a.probe else probe_serve()
    if a.driver:
        return driver(a)
    if os.geteuid() != 0:
        sys.exit("ep_overlap needs root (network namespaces, /dev/net/tun)")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    t_start, load = time.monotonic(), [os.getloadavg()[0]]
    switch_us, run_us = handoff_cost()
    print(f"turn hand-over {switch_us:.1f} us; a run of two empty microbatches {run_us:.1f} us", flush=True)
    for name, (whole, halves, ratio) in cut_cost(a).items():
        print(f"cut cost, {name}: whole batch {whole:.2f} ms, two halves one after the other {halves:.2f} ms "
              f"(medians; paired ratio {ratio:.3f}x)", flush=True)
    log_dir = Path(os.environ.get("TMPDIR", "/tmp")) / "ep_overlap"
    log_dir.mkdir(exist_ok=True)
    link = DelayLine(a.rate_mbit, a.delay_ms)
    res: dict[tuple[str, str], list[dict]] = {}
    info: dict[str, dict] = {}
    try:
        measured = link.probe()
        print(f"link: {link.describe()}; {measured}", flush=True)
        insts = {s: Instance(link, a, s, PORT + i, log_dir) for i, s in enumerate(SETTINGS)}
        try:
            for kind in ("decode", "prefill"):
                for block in range(a.blocks):
                    for s in SETTINGS if block % 2 == 0 else SETTINGS[::-1]:
                        res.setdefault((kind, s), []).append(insts[s].command(f"{kind} {a.steps}"))
                    load.append(os.getloadavg()[0])
                    print(f"  {kind} block {block}: " + ", ".join(
                        f"{s} {1e3 * statistics.median(res[(kind, s)][-1]['times']):.2f} ms" for s in SETTINGS),
                          flush=True)
        finally:
            for s, inst in insts.items():
                info[s] = inst.close()
    finally:
        link.close()
    print(f"\nlink: {link.describe()}; {measured}")
    print(f"EP 2, demo model, float32, fp32 dispatch, 1 torch thread per rank; load average (1 min) "
          f"{min(load):.1f}-{max(load):.1f} on {os.cpu_count()} cores; {time.monotonic() - t_start:.0f} s")
    turns = info.get("2", {})
    per_pass = turns.get("turn_switches", 0) / max(1, turns.get("forward_passes", 0))
    print(f"decode: {a.decode_batch} sequences per rank ({a.prompt_tokens}-token prompts); prefill: "
          f"{a.prefill_prompts} prompts of {a.prefill_tokens // a.prefill_prompts} tokens per rank per step; "
          f"{a.blocks} alternating blocks of {a.steps} steps")
    print(f"turns: {per_pass:.1f} hand-overs per forward pass of '2' on rank 0, at {switch_us:.1f} us each plus "
          f"{run_us:.1f} us per run: {(per_pass * switch_us + run_us) / 1e3:.2f} ms per forward pass")
    for kind in ("decode", "prefill"):
        med = {s: [statistics.median(b["times"]) for b in res[(kind, s)]] for s in SETTINGS}
        fastest = {s: min(t for b in res[(kind, s)] for t in b["times"]) for s in SETTINGS}
        comm = statistics.median(b["comm"] / a.steps for b in res[(kind, "1")])
        print(f"{kind}: step ms, median of blocks (fastest step): " + ", ".join(
            f"{s} {1e3 * statistics.median(med[s]):.2f} ({1e3 * fastest[s]:.2f})" for s in SETTINGS)
              + f"; '1' spends {1e3 * comm:.2f} ms per step in dispatch+combine on rank 0")
        print(f"  {kind} speedup of 2 over 1: {_spread([x / y for x, y in zip(med['1'], med['2'])])}")
        print(f"  {kind} speedup of 2 over 2-serial: {_spread([x / y for x, y in zip(med['2-serial'], med['2'])])}")

if __name__ == "__main__":
    main()
