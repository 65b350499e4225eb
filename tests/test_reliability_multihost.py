"""Multi-host for real: two "hosts" in separate network namespaces joined by a veth pair,
`torchrun --nnodes 2 --rdzv-backend c10d` across them (gloo). Metrics equal a one-host
`--nproc 2` run; a worker killed on host B ends host A within the collective timeout, leaves
nothing running, and `--resume` completes. Skipped where the sandbox forbids namespaces."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from embtables.experiments.launch_run import launch_run
from embtables.experiments.rundir import RunDir
from embtables.sharding.launch import free_port

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).with_name("torchrun")
METRICS = ("valid_auc", "test_auc", "valid_logloss", "test_logloss")


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


@contextmanager
def two_hosts():
    if shutil.which("ip") is None or os.geteuid() != 0:
        pytest.skip("needs root and iproute2 (`ip netns`) to make two network namespaces")
    tag = f"et{os.getpid() % 100000}"
    net = f"10.213.{os.getpid() % 250}"
    hosts = [(f"{tag}a", f"{net}.1", f"{tag}va"), (f"{tag}b", f"{net}.2", f"{tag}vb")]
    try:
        for ns, _, _ in hosts:
            _ip("netns", "add", ns)
        _ip("link", "add", hosts[0][2], "type", "veth", "peer", "name", hosts[1][2])
        for ns, addr, dev in hosts:
            _ip("link", "set", dev, "netns", ns)
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
    except (subprocess.CalledProcessError, OSError) as e:
        for ns, _, _ in hosts:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        pytest.skip(f"the sandbox forbids network namespaces: {getattr(e, 'stderr', e)}")
    try:
        yield hosts
    finally:
        for ns, _, _ in hosts:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def _overrides(data: Path) -> list[str]:
    return [
        f"data.path={data}",
        "data.max_train_rows=null",
        "data.max_eval_rows=null",
        "train.progress=false",
        "train.batch_size=256",
        "train.max_steps=12",
        "train.eval_every=4",
        "train.threads=1",
        "sharding.timeout_s=20",
    ]


def _torchrun(host, master: str, port: int, run_args: list[str], log: Path, fault: str | None = None):
    ns, addr, dev = host
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": dev}
    env.pop("EMBTABLES_FAULT", None)
    if fault:
        env["EMBTABLES_FAULT"] = fault
    cmd = [
        "ip",
        "netns",
        "exec",
        ns,
        str(TORCHRUN),
        "--nnodes",
        "2",
        "--nproc-per-node",
        "1",
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        f"{master}:{port}",
        "--rdzv-id",
        f"job{port}",
        # torchrun tells the store's host by its hostname, which both namespaces share
        "--rdzv-conf",
        f"is_host={'true' if addr == master else 'false'}",
        "--local-addr",
        addr,
        "--max-restarts",
        "0",
        "-m",
        "embtables.cli",
        *run_args,
    ]
    return subprocess.Popen(
        cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True
    )


def _descendants(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-e", "-o", "pid=,ppid="], capture_output=True, text=True).stdout.split()
    pairs = list(zip(map(int, out[::2]), map(int, out[1::2]), strict=True))
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in pairs if pp == p]
        found += kids
        todo += kids
    return found


@pytest.fixture(scope="module")
def one_host(tiny_synth, tmp_path_factory):
    d = tmp_path_factory.mktemp("onehost") / "r"
    launch_run("quickstart-dist", _overrides(tiny_synth), str(d), None, 2, timeout_s=600)
    return json.loads((d / "summary.json").read_text())


@pytest.mark.slow  # ~2 min on a loaded 2-core machine: run with -m slow
def test_two_hosts_equal_one_host_and_a_lost_worker_ends_the_job(one_host, tiny_synth, tmp_path):
    with two_hosts() as hosts:
        master = hosts[0][1]
        # 1. Two hosts, same metrics as one host with two processes.
        d = tmp_path / "two"
        port = free_port()
        args = [
            "run",
            "quickstart-dist",
            "--run-dir",
            str(d),
            *sum((["--set", o] for o in _overrides(tiny_synth)), []),
        ]
        procs = [_torchrun(h, master, port, args, tmp_path / f"two-{i}.log") for i, h in enumerate(hosts)]
        for p in procs:
            p.wait(timeout=600)
        logs = [(tmp_path / f"two-{i}.log").read_text() for i in range(2)]
        assert [p.returncode for p in procs] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
        two = json.loads((d / "summary.json").read_text())
        assert two["world_size"] == 2
        for k in METRICS:
            assert two[k] == pytest.approx(one_host[k], abs=1e-6), k

        # 2. The worker on host B dies (SIGKILL at step 6, after the step-4 checkpoint).
        d = tmp_path / "killed"
        port = free_port()
        args = [
            "run",
            "quickstart-dist",
            "--run-dir",
            str(d),
            *sum((["--set", o] for o in _overrides(tiny_synth)), []),
        ]
        a = _torchrun(hosts[0], master, port, args, tmp_path / "a.log")
        b = _torchrun(hosts[1], master, port, args, tmp_path / "b.log", fault="kill_after_step:6")
        b.wait(timeout=600)
        t_dead = time.monotonic()
        try:
            a.wait(timeout=50)
        except subprocess.TimeoutExpired:
            tail = (tmp_path / "a.log").read_text()[-3000:]
            pytest.fail(f"host A still running 50 s after host B's worker died:\n{tail}")
        waited = time.monotonic() - t_dead
        a_log = (tmp_path / "a.log").read_text()
        assert a.returncode != 0 and b.returncode != 0, a_log[-2000:]
        assert waited < 50
        time.sleep(1)
        assert not _descendants(a.pid) and not _descendants(b.pid)  # nothing left running
        assert RunDir(d).latest_checkpoint().name == "step-00000004" and not RunDir(d).is_finished()
        # host A names the rank it lost, and host B's address (the rank's number depends on
        # the rendezvous order, so both are accepted as long as it is not host A's own)
        m = re.search(r"lost rank (\d) \([^,]*, ([\d.]+)\) during a collective", a_log)
        assert m and m.group(2) == hosts[1][1], a_log[-3000:]
        assert "embtables run --resume" in a_log
        print(f"\nhost A ended {waited:.1f} s after host B's worker died; its last lines:\n{a_log[-1500:]}")

        # 3. --resume (both hosts again) completes with the uninterrupted metrics.
        port = free_port()
        resume = ["run", "--resume", str(d)]
        procs = [_torchrun(h, master, port, resume, tmp_path / f"res-{i}.log") for i, h in enumerate(hosts)]
        for p in procs:
            p.wait(timeout=600)
        assert [p.returncode for p in procs] == [0, 0], (tmp_path / "res-0.log").read_text()[-3000:]
        resumed = json.loads((d / "summary.json").read_text())
        for k in METRICS:
            assert resumed[k] == pytest.approx(one_host[k], abs=1e-6), k
