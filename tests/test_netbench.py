"""`dist-lm bench-net`: the ring model it prints, its bad input, and its plumbing across
simulated nodes (a tiny run; the figures are the benchmark's, not the test's)."""

import subprocess
from pathlib import Path

import pytest

from conftest import VALID, dist_lm
from dist_lm.errors import UsageError
from dist_lm.tools import netbench
from dist_lm.tools.netbench import bits_per_s, ring_ms


def test_the_ring_model_is_two_n_minus_one_over_n_bytes_over_bandwidth():
    assert bits_per_s("1gbit") == 1e9 and bits_per_s("100mbit") == 1e8
    # 29.4 MB over 3 nodes at 1 Gbit/s: 2 x 2/3 x 29.4e6 x 8 / 1e9 s = 313.6 ms
    assert ring_ms(3, 29.4, "1gbit") == pytest.approx(313.6)
    assert ring_ms(2, 10.0, "10gbit") == pytest.approx(8.0)
    with pytest.raises(UsageError):
        bits_per_s("fast")


@pytest.mark.medium
@pytest.mark.parametrize("flags,message", [
    (["--rates", "1gb"], "a rate is a number and kbit, mbit or gbit"),
    (["--nodes", "1"], "--nodes needs counts of at least 2"),
    (["--controllers", "nccl"], "--controllers mpi and/or gloo"),
])
def test_bad_flags_are_one_line_and_exit_2(flags, message):
    proc = dist_lm("bench-net", "--train-file", VALID, *flags, timeout=120)
    assert proc.returncode == 2 and message in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


@pytest.mark.dist
def test_it_measures_across_simulated_nodes_and_tears_the_cluster_down(tmp_path):
    out = tmp_path / "net.json"
    proc = dist_lm("bench-net", "--train-file", VALID, "--rates", "1gbit", "--nodes", "2",
                   "--controllers", "gloo,mpi", "--steps", "1", "--warmup", "1", "--json",
                   out, "--cache-dir", tmp_path / "cache", timeout=900)
    if proc.returncode == 2 and "cannot create network namespaces" in proc.stderr:
        pytest.skip(proc.stderr.strip())
    assert proc.returncode == 0, proc.stderr
    rows = [line.split() for line in proc.stdout.splitlines() if line.startswith("1gbit")]
    assert [(r[1], r[2], r[3]) for r in rows] == [("2", "gloo", "no"), ("2", "gloo", "yes"),
                                                  ("2", "mpi", "no"), ("2", "mpi", "yes")]
    assert all(float(r[6]) > 0 for r in rows)  # the allreduce was timed
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert "dlbench" not in left
    assert not list(Path("/etc/netns").glob("dlbench-*"))


def test_the_simulated_cluster_script_is_found_and_its_absence_is_one_line(monkeypatch, tmp_path):
    assert netbench.SIM.is_file()  # this checkout's launch/sim-cluster
    monkeypatch.setattr(netbench, "SIM", tmp_path / "no-sim-cluster")
    with pytest.raises(UsageError, match=r"^bench-net: no .*no-sim-cluster: it runs from a "
                                         r"checkout"):
        netbench.Cluster(2).__enter__()
