"""Two-microbatch overlap at EP 2 over a shaped link, same run: decode step time and prefill step
time with ``--microbatches 2`` against ``--microbatches 1``.

The two ranks run in two network namespaces joined by one veth pair, so every dispatch, combine
and control message crosses it. Both ends of the pair are shaped with ``tc`` on egress: netem
(delay and rate) where the kernel has it, else tbf (rate only; the delay is then not emulated
and the output says so). Rank 1 is ``python -m matrixinfer.parallel.rank`` in the second
namespace; rank 0 is this script again (``--driver``) in the first, driving the instance's
engine step by step (the same :class:`~matrixinfer.parallel.dp_engine.DPEngine` that serves).
One instance of each setting runs at once (the idle one's ranks wait in a collective), and their
timed blocks of ``--steps`` steps alternate, so that adjacent blocks share the machine's load:
the table gives each setting's median step time and the median of the per-block ratios. The demo
model, float32, fp32 dispatch, one torch thread per rank.

    sudo python benchmarks/ep_overlap.py [--rate 1gbit] [--delay-ms 0.2] [--decode-batch 64]
        [--prefill-tokens 512] [--steps 4] [--blocks 8]

Needs root and iproute2 (network namespaces, tc).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SETTINGS = ("1", "2", "2-serial")  # --microbatches 1; 2; 2 with TurnScheduler.overlap off (the control)
RANK1 = "import sys; from matrixinfer.parallel.rank import main; sys.exit(main(sys.argv[1:]))"
RANK1_SERIAL = ("import sys; from matrixinfer.parallel.microbatch import TurnScheduler; TurnScheduler.overlap = False; "
                "from matrixinfer.parallel.rank import main; sys.exit(main(sys.argv[1:]))")
ADDR = ("10.204.0.1", "10.204.0.2")
PORT = 29631


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=20)


class ShapedLink:
    """Two namespaces and a veth pair between them, each end's egress shaped (:meth:`describe`
    says how)."""

    def __init__(self, rate: str, delay_ms: float) -> None:
        tag = f"mio{os.getpid() % 100000}"
        self.ns = (f"{tag}a", f"{tag}b")
        self.dev = (f"{tag}va", f"{tag}vb")
        self.shaping: list[str] = []
        for ns in self.ns:
            _ip("netns", "add", ns)
        try:
            _ip("link", "add", self.dev[0], "netns", self.ns[0], "type", "veth", "peer", "name", self.dev[1],
                "netns", self.ns[1])
            for ns, dev, addr in zip(self.ns, self.dev, ADDR):
                _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
                _ip("-n", ns, "link", "set", dev, "up")
                _ip("-n", ns, "link", "set", "lo", "up")
                self.shaping.append(self._shape(ns, dev, rate, delay_ms))
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _shape(ns: str, dev: str, rate: str, delay_ms: float) -> str:
        tc = ["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root"]
        netem = [*tc, "netem", "delay", f"{delay_ms}ms", "rate", rate, "limit", "100000"]
        if delay_ms > 0 and subprocess.run(netem, capture_output=True).returncode == 0:
            return f"netem delay {delay_ms}ms rate {rate}"
        # no sch_netem in this kernel: rate only (burst ~16 KiB: short messages are shaped too)
        subprocess.run([*tc, "tbf", "rate", rate, "burst", "16kb", "latency", "100ms"], check=True,
                       capture_output=True)
        return f"tbf rate {rate} burst 16kb" + (" (netem unavailable: delay NOT emulated)" if delay_ms > 0 else "")

    def describe(self) -> str:
        return f"veth pair, egress of each end: {self.shaping[0]}"

    def exec(self, side: int, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.ns[side], *argv]

    def close(self) -> None:
        for ns in self.ns:
            for pid in _ip("netns", "pids", ns, check=False).stdout.split():
                try:
                    os.kill(int(pid), 9)
                except (ProcessLookupError, ValueError):
                    pass
            _ip("netns", "del", ns, check=False)


def _config(a: argparse.Namespace, microbatches: int):
    from matrixinfer.config import EngineConfig

    return EngineConfig(device="cpu", dtype="float32", ep=2, nnodes=2, master_addr=ADDR[0], master_port=PORT,
                        microbatches=microbatches, max_num_seqs=a.decode_batch,
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
    JSON line of step times on stdout per command."""
    import torch

    from matrixinfer.engine.sampling_params import SamplingParams
    from matrixinfer.parallel.launch import start_instance
    from matrixinfer.parallel.microbatch import TurnScheduler

    TurnScheduler.overlap = not a.serial
    cfg = dataclasses.replace(_config(a, a.microbatches), node_rank=0, master_port=a.port)
    inst = start_instance(cfg)
    eng = inst.engine
    vocab = eng.runner.model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    warm, total = 3, a.steps * a.blocks
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
            elif kind != phase and kind == "prefill":  # one prompt of prefill_tokens per rank per step
                while eng.has_work():
                    eng.step()
                params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
                for i in range(2 * (warm + total)):
                    eng.add_request(f"p{i}", torch.randint(2, vocab, (a.prefill_tokens,), generator=g).tolist(),
                                    params)
                _timed_steps(eng, warm)
            phase = kind
            print(json.dumps(_timed_steps(eng, int(n))), flush=True)
        turns = eng.group.turns
        print(json.dumps({"turn_switches": turns.switches if turns is not None else 0,
                          "forward_passes": turns.runs if turns is not None else 0}), flush=True)
    finally:
        inst.close()


class Instance:
    """One EP 2 instance over the link: rank 1 in the second namespace, the driver (rank 0) in
    the first, taking commands on a pipe."""

    def __init__(self, link: ShapedLink, a: argparse.Namespace, setting: str, port: int, log_dir: Path) -> None:
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

    def command(self, line: str) -> list[float]:
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rate", default="1gbit", help="link rate (tc syntax)")
    p.add_argument("--delay-ms", type=float, default=0.2, help="one-way delay per direction (netem only)")
    p.add_argument("--decode-batch", type=int, default=64, help="decoding sequences per rank")
    p.add_argument("--prompt-tokens", type=int, default=8, help="prompt length of the decode requests")
    p.add_argument("--prefill-tokens", type=int, default=512, help="prompt tokens per rank per prefill step")
    p.add_argument("--steps", type=int, default=4, help="steps per timed block")
    p.add_argument("--blocks", type=int, default=8, help="timed blocks per setting and kind (alternating)")
    p.add_argument("--driver", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--microbatches", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=PORT, help=argparse.SUPPRESS)
    p.add_argument("--serial", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    a.forward = ["--decode-batch", str(a.decode_batch), "--prompt-tokens", str(a.prompt_tokens),
                 "--prefill-tokens", str(a.prefill_tokens), "--steps", str(a.steps), "--blocks", str(a.blocks)]
    if a.driver:
        driver(a)
        return
    if os.geteuid() != 0:
        sys.exit("ep_overlap needs root (network namespaces and tc)")
    log_dir = Path(os.environ.get("TMPDIR", "/tmp")) / "ep_overlap"
    log_dir.mkdir(exist_ok=True)
    link = ShapedLink(a.rate, a.delay_ms)
    times: dict[tuple[str, str], list[list[float]]] = {}
    info: dict[str, dict] = {}
    load = os.getloadavg()[0]
    try:
        # both instances live at once (the idle one's ranks block in a collective); their timed blocks
        # alternate, so that adjacent blocks of the two settings share the machine's load
        insts = {s: Instance(link, a, s, PORT + i, log_dir) for i, s in enumerate(SETTINGS)}
        try:
            for kind in ("decode", "prefill"):
                for block in range(a.blocks):
                    order = SETTINGS if block % 2 == 0 else SETTINGS[::-1]
                    for s in order:
                        times.setdefault((kind, s), []).append(insts[s].command(f"{kind} {a.steps}"))
                    print(f"  {kind} block {block}: " + ", ".join(
                        f"{s} {1e3 * statistics.median(times[(kind, s)][-1]):.2f} ms" for s in SETTINGS), flush=True)
        finally:
            for s, inst in insts.items():
                info[s] = inst.close()
    finally:
        link.close()
    load = max(load, os.getloadavg()[0])
    print(f"\nlink: {link.describe()}")
    print(f"EP 2 (two network namespaces), demo model, float32, fp32 dispatch, 1 torch thread per rank; "
          f"load average up to {load:.1f} on {os.cpu_count()} cores")
    print(f"decode: {a.decode_batch} sequences per rank ({a.prompt_tokens}-token prompts); prefill: "
          f"{a.prefill_tokens} prompt tokens per rank per step; {a.blocks} alternating blocks of {a.steps} steps")
    print(f"{SETTINGS[1]}: {info.get(SETTINGS[1], {}).get('turn_switches', '?')} turn switches over "
          f"{info.get(SETTINGS[1], {}).get('forward_passes', '?')} forward passes on rank 0; {SETTINGS[2]}: "
          f"the same cut, microbatch 0 runs to its end before 1 starts (no overlap: the control)")
    print(f"| step | {' | '.join(f'{s} (ms, median)' for s in SETTINGS)} | speedup of 2 over 1 (per-block "
          f"ratios: median, min-max) | speedup of 2 over 2-serial (same) |")
    print("|---|---|---|---|---|---|")
    for kind in ("decode", "prefill"):
        med = {s: statistics.median(t for b in times[(kind, s)] for t in b) for s in SETTINGS}

        def ratio(base: str, s: str = SETTINGS[1], kind: str = kind) -> str:
            r = [statistics.median(x) / statistics.median(y) for x, y in zip(times[(kind, base)], times[(kind, s)])]
            return f"{statistics.median(r):.3f}x ({min(r):.2f}-{max(r):.2f})"

        print(f"| {kind} | {' | '.join(f'{1e3 * med[s]:.2f}' for s in SETTINGS)} | {ratio(SETTINGS[0])} | "
              f"{ratio(SETTINGS[2])} |")


if __name__ == "__main__":
    main()
