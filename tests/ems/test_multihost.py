"""Multi-host: servers, a client and etcd in separate network namespaces joined by veth + a bridge.

Each "host" is a network namespace with its own address on 10.203.0.0/24, so traffic crosses veth
links and the same-host shared-memory path is not taken. Membership lives in etcd. Needs root,
iproute2 and etcd (Debian's etcd-server); skipped with the reason otherwise.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from matrixinfer.ems.arena import remove_orphan_segments
from tests.ems.conftest import REPO, spawn

CLIENT_SCRIPT = r'''
import json, os, signal, sys, time
from matrixinfer.ems.client import EmsClient
from matrixinfer.ems.membership import EtcdMembership

etcd, s1, s1_pid = sys.argv[1], sys.argv[2], int(sys.argv[3])
view = EtcdMembership(etcd, cluster="nstest")
deadline = time.monotonic() + 20
while time.monotonic() < deadline:
    try:
        if len(view.members()) == 2:
            break
    except ConnectionError:
        pass
    time.sleep(0.2)
out = {"members_before": view.members()}
client = EmsClient(membership=view, namespace="mh", refresh_s=0.2, timeout=2.0)
values = {f"k{i}": os.urandom(1000 + i) for i in range(200)}
out["stored"] = sum(client.mput(list(values.items())))
owners = {k: client.ring.primary(k.encode()) for k in values}
out["fast_path"] = any(c.arena is not None for c in client._local.conns.values())
out["identical_before"] = client.mget(list(values)) == list(values.values())
os.kill(s1_pid, signal.SIGKILL)
t0 = time.monotonic()
errors = 0
while s1 in client.ring.nodes and time.monotonic() - t0 < 15:
    try:
        client.mget(list(values)[:20])  # keeps serving (misses allowed) while the lease runs out
    except Exception:
        errors += 1
    time.sleep(0.2)
    client.refresh()
out["left_after_s"] = time.monotonic() - t0
out["members_after"] = view.members()
got = client.mget(list(values))
out["errors"] = errors
out["s1_keys"] = sum(1 for k in values if owners[k] == s1)
out["s1_keys_missing"] = sum(1 for g, k in zip(got, values) if owners[k] == s1 and g is None)
out["others_identical"] = all(g == values[k] for g, k in zip(got, values) if owners[k] != s1)
out["rewritten"] = sum(client.mput(list(values.items())))
print(json.dumps(out))
'''


def _run(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, timeout=20)


@pytest.fixture
def netns_hosts(tmp_path):
    """Namespaces etcd, s1, s2, cl on a bridge; yields ``(prefix, addresses)``."""
    if os.geteuid() != 0:
        pytest.skip("multi-host test needs root to create network namespaces (ip netns)")
    if not shutil.which("ip"):
        pytest.skip("multi-host test needs iproute2's `ip` (apt-get install iproute2)")
    if not shutil.which("etcd"):
        pytest.skip("multi-host test needs etcd (apt-get install etcd-server)")
    prefix = f"e{os.getpid() % 100000}"
    names = ["etcd", "s1", "s2", "cl"]
    created: list[str] = []
    try:
        try:
            _run("ip", "netns", "add", f"{prefix}sw")
        except (subprocess.CalledProcessError, OSError) as exc:
            pytest.skip(f"cannot create network namespaces here: {getattr(exc, 'stderr', exc)!r}")
        created.append(f"{prefix}sw")
        _run("ip", "-n", f"{prefix}sw", "link", "add", "br0", "type", "bridge")
        _run("ip", "-n", f"{prefix}sw", "link", "set", "br0", "up")
        addrs = {}
        for i, name in enumerate(names):
            ns, a, b = f"{prefix}{name}", f"{prefix}v{i}a", f"{prefix}v{i}b"
            _run("ip", "netns", "add", ns)
            created.append(ns)
            _run("ip", "-n", f"{prefix}sw", "link", "add", a, "type", "veth", "peer", "name", b, "netns", ns)
            _run("ip", "-n", f"{prefix}sw", "link", "set", a, "master", "br0", "up")
            addrs[name] = f"10.203.0.{i + 1}"
            _run("ip", "-n", ns, "addr", "add", f"{addrs[name]}/24", "dev", b)
            _run("ip", "-n", ns, "link", "set", b, "up")
            _run("ip", "-n", ns, "link", "set", "lo", "up")
        yield prefix, addrs
    finally:
        for ns in reversed(created):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=20)


def test_servers_and_client_on_separate_hosts_with_etcd_membership(netns_hosts, tmp_path):
    prefix, addrs = netns_hosts
    etcd_url = f"http://{addrs['etcd']}:2379"
    procs: list[subprocess.Popen] = []
    try:
        etcd = subprocess.Popen(
            ["ip", "netns", "exec", f"{prefix}etcd", "etcd", "--data-dir", str(tmp_path / "etcd"),
             "--listen-client-urls", etcd_url, "--advertise-client-urls", etcd_url,
             "--listen-peer-urls", "http://127.0.0.1:2380", "--initial-advertise-peer-urls", "http://127.0.0.1:2380",
             "--initial-cluster", "default=http://127.0.0.1:2380"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(etcd)
        servers = {}
        for name in ("s1", "s2"):
            proc, addr = spawn(["--capacity", "16M", "--listen", f"{addrs[name]}:7000", "--etcd", etcd_url,
                                "--cluster", "nstest", "--lease-ttl", "2"],
                               prefix=["ip", "netns", "exec", f"{prefix}{name}"])
            procs.append(proc)
            servers[name] = (proc, addr)
        env = dict(os.environ, PYTHONPATH=str(REPO))
        run = subprocess.run(["ip", "netns", "exec", f"{prefix}cl", sys.executable, "-c", CLIENT_SCRIPT,
                              etcd_url, servers["s1"][1], str(servers["s1"][0].pid)],
                             capture_output=True, text=True, env=env, timeout=60)
        assert run.returncode == 0, run.stderr[-3000:]
        out = json.loads(run.stdout.strip().splitlines()[-1])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)
        remove_orphan_segments()  # the SIGKILLed server's arena
    assert out["members_before"] == sorted([servers["s1"][1], servers["s2"][1]])
    assert out["stored"] == 200 and out["identical_before"]
    assert out["fast_path"] is False  # another network namespace is another host: TCP only
    assert out["members_after"] == [servers["s2"][1]] and out["left_after_s"] < 8
    assert out["errors"] == 0
    assert out["s1_keys"] > 20 and out["s1_keys_missing"] == out["s1_keys"]
    assert out["others_identical"] and out["rewritten"] == 200
