"""launch/sim-cluster: a simulated multi-node cluster on this machine (network namespaces on a
bridge of their own, a host name and an sshd per node), and mpirun / horovodrun across it.

Each test cluster has its own SIM_PREFIX and a state directory under tmp_path, and is torn
down whatever happens. The tests skip only when the script says this machine cannot create
network namespaces (exit 77: not root, or `ip netns add` fails)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time

import pytest

from conftest import BIN, SIM, Sim, alive, run, sim_cluster
from dist_lm.runtime.procs import kill_session

pytestmark = pytest.mark.dist

NODES = ["node1", "node2", "node3"]
ADDR = {f"node{i}": f"10.213.7.{10 + i}" for i in range(1, 4)}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with sim_cluster("dlsimtest", tmp_path_factory, 3) as sim:
        yield sim


def test_status_lists_the_nodes(cluster):
    out = cluster.ok("status").stdout
    for node in NODES:
        assert re.search(rf"{node}\s+{re.escape(ADDR[node])}\s+port UP\s+sshd \d+", out), out


def test_addresses_and_routes_stay_inside_the_cluster(cluster):
    """The network rule, read from the routing tables (no packet is sent): a node routes
    only its /24 over eth0 (no default route), the bridge namespace has no address at all."""
    for node in NODES:
        routes = cluster.on(node, "ip", "-4", "route", "show", "table", "all").stdout
        main = [r for r in routes.splitlines() if "table local" not in r]
        assert main == [f"10.213.7.0/24 dev eth0 proto kernel scope link src {ADDR[node]} "], routes
        addrs = cluster.on(node, "ip", "-4", "-o", "addr").stdout
        assert re.findall(r"inet (\S+)", addrs) == ["127.0.0.1/8", f"{ADDR[node]}/24"]
    bridge = run(["ip", "-n", f"{cluster.prefix}-br", "-4", "-o", "addr"]).stdout
    assert re.findall(r"inet (\S+)", bridge) == ["127.0.0.1/8"]
    assert run(["ip", "-n", f"{cluster.prefix}-br", "-4", "route"]).stdout == ""
    for ns in cluster.namespaces():  # IPv4 only: not even a link-local IPv6 address
        assert run(["ip", "-n", ns, "-6", "-o", "addr"]).stdout == "", ns
    # And nothing of the cluster's in this, the host's, namespace: no address in its /24,
    # no end of its veth pairs.
    assert "10.213.7." not in run(["ip", "-o", "addr"]).stdout
    assert not re.search(r"\bveth-node\d", run(["ip", "-o", "link"]).stdout)


def test_each_node_has_its_host_name(cluster):
    for node in NODES:
        assert cluster.on(node, "hostname").stdout.strip() == node


def test_exec_passes_environment_and_exit_code(cluster):
    done = cluster("exec", "node2", "sh", "-c", 'echo "$SIM_PREFIX"; exit 7')
    assert (done.returncode, done.stdout.strip()) == (7, cluster.prefix)


def test_nodes_resolve_each_other_by_name(cluster):
    out = cluster.on("node2", "getent", "hosts", *NODES).stdout
    got = dict(reversed(line.split()) for line in out.splitlines())
    assert got == ADDR
    # Gloo and ORTE look up the node's own name: it must be the node address, not loopback.
    own = cluster.on("node2", "python", "-c",
                     "import socket; print(socket.gethostbyname(socket.gethostname()))")
    assert own.stdout.strip() == ADDR["node2"]


def test_node1_reaches_the_others_over_ssh(cluster):
    for target in ("node2", "node3"):
        done = cluster.on("node1", "ssh", "-F", cluster.ssh_config, target, "hostname")
        assert done.stdout.strip() == target
    # Without -F too: inside a node /etc/ssh is the cluster's (how mpirun and horovodrun ssh).
    assert cluster.on("node3", "ssh", "node1", "hostname").stdout.strip() == "node1"


def ssh_from_node1(cluster, target):
    return cluster("exec", "node1", "ssh", "-o", "ConnectTimeout=3", target, "hostname",
                   timeout=60)


def test_partition_cuts_a_node_off_and_heal_reconnects_it(cluster):
    try:
        cluster.ok("partition", "node3")
        start = time.monotonic()
        cut = ssh_from_node1(cluster, "node3")
        assert cut.returncode != 0, cut.stdout
        assert time.monotonic() - start < 10
        assert ssh_from_node1(cluster, "node2").stdout.strip() == "node2"
        assert "DOWN (partitioned)" in cluster.ok("status").stdout
        cluster.ok("heal", "node3")
        deadline = time.monotonic() + 10
        while (healed := ssh_from_node1(cluster, "node3")).returncode != 0:
            assert time.monotonic() < deadline, healed.stderr
            time.sleep(0.5)
        assert healed.stdout.strip() == "node3"
    finally:
        cluster("heal", "node3")


def egress_qdisc(cluster, node):
    return cluster.on(node, "tc", "qdisc", "show", "dev", "eth0").stdout


def test_shape_limits_every_node_egress_and_off_removes_it(cluster):
    try:
        cluster.ok("shape", "1gbit")
        for node in NODES:
            assert re.search(r"qdisc tbf .*rate 1Gbit", egress_qdisc(cluster, node))
        cluster.ok("shape", "off")
        for node in NODES:
            assert "tbf" not in egress_qdisc(cluster, node)
        assert cluster("shape", "fast").returncode != 0
    finally:
        cluster("shape", "off")


def mpirun(cluster, *args):
    assert shutil.which("mpirun"), "no mpirun (launch/setup-env.sh installs OpenMPI)"
    # ORTE's out-of-band and the TCP BTL on the node network (eth0 is the node interface
    # on every node, so one name fits all hosts); ssh with the cluster's client config.
    return ["mpirun", "--allow-run-as-root",
            "--mca", "plm_rsh_agent", f"ssh -F {cluster.ssh_config}",
            "--mca", "oob_tcp_if_include", "eth0", "--mca", "btl_tcp_if_include", "eth0",
            *args]


def test_mpirun_from_node1_runs_on_node1_and_node2(cluster):
    cmd = mpirun(cluster, "-np", "2", "-H", "node1:1,node2:1", "hostname")
    out = cluster.on("node1", *cmd, timeout=120).stdout
    assert sorted(out.split()) == ["node1", "node2"]


def test_mpirun_hostfile_allreduce_over_node_network(cluster):
    # Rank 0 prints for all: mpirun interleaves several ranks' output within a line.
    code = ("from mpi4py import MPI; import socket; c = MPI.COMM_WORLD; "
            "got = c.gather((c.rank, socket.gethostname(), c.allreduce(c.rank + 1))); "
            "c.rank == 0 and print(got)")
    cmd = mpirun(cluster, "-np", "3", "--hostfile", cluster.state / "hostfile",
                 "--mca", "btl", "self,tcp", BIN / "python", "-c", code)
    out = cluster.on("node1", *cmd, timeout=120).stdout
    assert out.strip() == "[(0, 'node1', 6), (1, 'node2', 6), (2, 'node3', 6)]"


def test_horovodrun_gloo_from_node1_runs_on_node1_and_node2(cluster):
    code = ("import socket, mxnet as mx, horovod.mxnet as hvd; hvd.init(); "
            "s = hvd.allreduce(mx.nd.array([hvd.rank() + 1.0]), average=False).asscalar(); "
            "print('rank', hvd.rank(), hvd.size(), socket.gethostname(), s)")
    out = cluster.on("node1", BIN / "horovodrun", "--gloo", "-np", "2", "-H", "node1:1,node2:1",
                     "--disable-cache", "--network-interface", "eth0",
                     "python", "-c", code, timeout=300).stdout
    ranks = sorted(re.findall(r"rank (\d) (\d) (\S+) (\S+)", out))
    assert ranks == [("0", "2", "node1", "3.0"), ("1", "2", "node2", "3.0")], out


def test_down_leaves_nothing(tmp_path):
    sim = Sim("dlsimtestd", tmp_path / "state")
    stray = None
    try:
        sim.up(2)
        pids = sim.sshd_pids()
        assert sorted(pids) == ["node1", "node2"] and all(alive(p) for p in pids.values())
        # A process left running inside a node goes too.
        stray = subprocess.Popen([SIM, "exec", "node2", "sleep", "600"],
                                 env=dict(os.environ, **sim.env),
                                 start_new_session=True)
        deadline = time.monotonic() + 10
        while str(stray.pid) not in run(["ip", "netns", "pids", "dlsimtestd-node2"]).stdout:
            assert time.monotonic() < deadline and stray.poll() is None
            time.sleep(0.1)
        assert "down" in sim.ok("down").stdout
        assert stray.wait(timeout=10) != 0
        sim.assert_gone(pids)
        assert sim.ok("down").returncode == 0  # idempotent
        assert "nothing up" in sim.ok("status").stdout
    finally:
        sim("down")
        if stray is not None and stray.poll() is None:
            kill_session(stray.pid)


def test_up_again_without_down_cleans_the_leftovers(tmp_path):
    sim = Sim("dlsimtestu", tmp_path / "state")
    try:
        sim.up(2)
        first = sim.sshd_pids()
        sim.up(2)
        assert not [p for p in first.values() if alive(p)]
        assert sorted(sim.namespaces()) == ["dlsimtestu-br", "dlsimtestu-node1",
                                            "dlsimtestu-node2"]
        assert sim.on("node1", "ssh", "node2", "hostname").stdout.strip() == "node2"
        second = sim.sshd_pids()
    finally:
        sim("down")
    sim.assert_gone(second)
