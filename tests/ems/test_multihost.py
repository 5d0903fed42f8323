"""Multi-host: servers, a client and etcd in separate network namespaces joined by veth + a bridge.

Each "host" is a network namespace (tests/netns.py), so traffic crosses veth links and the same-host
shared-memory path is not taken. Membership lives in etcd. Needs root, iproute2 and etcd (Debian's
etcd-server); skipped with the reason otherwise.
"""

from __future__ import annotations

import json
import shutil

import pytest

from tests.helpers import spawn

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


pytestmark = pytest.mark.skipif(not shutil.which("etcd"),
                                reason="multi-host test needs etcd (apt-get install etcd-server)")


def test_servers_and_client_on_separate_hosts_with_etcd_membership(netns_hosts, tmp_path):
    hosts = netns_hosts("etcd", "s1", "s2", "cl")
    etcd_url = f"http://{hosts['etcd'].address}:2379"
    hosts.start("etcd", ["etcd", "--data-dir", str(tmp_path / "etcd"),
                         "--listen-client-urls", etcd_url, "--advertise-client-urls", etcd_url,
                         "--listen-peer-urls", "http://127.0.0.1:2380",
                         "--initial-advertise-peer-urls", "http://127.0.0.1:2380",
                         "--initial-cluster", "default=http://127.0.0.1:2380"], tmp_path / "etcd.log")
    servers = {}
    for name in ("s1", "s2"):
        proc, addr = spawn(["--capacity", "16M", "--listen", f"{hosts[name].address}:7000", "--etcd", etcd_url,
                            "--cluster", "nstest", "--lease-ttl", "2"], prefix=hosts[name].command())
        servers[name] = (hosts.track(proc), addr)
    run = hosts.run_python("cl", CLIENT_SCRIPT, etcd_url, servers["s1"][1], str(servers["s1"][0].pid), timeout=60)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["members_before"] == sorted([servers["s1"][1], servers["s2"][1]])
    assert out["stored"] == 200 and out["identical_before"]
    assert out["fast_path"] is False  # another network namespace is another host: TCP only
    assert out["members_after"] == [servers["s2"][1]] and out["left_after_s"] < 8
    assert out["errors"] == 0
    assert out["s1_keys"] > 20 and out["s1_keys_missing"] == out["s1_keys"]
    assert out["others_identical"] and out["rewritten"] == 200
