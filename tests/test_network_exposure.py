"""What the single-process launcher and the private Ray instance listen on: loopback only, found by the
PIDs they started (torchrun's store and Ray nodes on other addresses cannot be bound; see the README)."""

import ipaddress
import json
import os
import subprocess
import sys
import time

import pytest

psutil = pytest.importorskip("psutil")

ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "RAY_DISABLE_USAGE_STATS": "1"}


def _listeners(pids) -> set[tuple[int, str, int]]:
    """(pid, address, port) of every listening TCP socket of these processes (gone ones are skipped)."""
    found = set()
    for pid in pids:
        try:
            connections = psutil.Process(pid).net_connections(kind="inet")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        found |= {(pid, c.laddr.ip, c.laddr.port) for c in connections if c.status == psutil.CONN_LISTEN}
    return found


def _is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%")[0])
    mapped = getattr(ip, "ipv4_mapped", None)  # ::ffff:127.0.0.1, a dual-stack socket bound to IPv4 loopback
    return (mapped or ip).is_loopback


def _with_children(pids) -> set[int]:
    found = set(pids)
    for pid in pids:
        try:
            found |= {child.pid for child in psutil.Process(pid).children(recursive=True)}
        except psutil.NoSuchProcess:
            pass
    return found


SINGLE_PROCESS = """
import json, psutil, torch
from xgem_dist.train.engine import init_distributed
init_distributed(60)
x = torch.ones(2)
torch.distributed.all_reduce(x)
torch.distributed.all_reduce(x, group=torch.distributed.new_group([0]))  # DeepSpeed makes groups like this
print(json.dumps([[c.laddr.ip, c.laddr.port] for c in psutil.Process().net_connections(kind="inet")
                  if c.status == psutil.CONN_LISTEN]))
"""


def test_the_single_process_group_listens_on_loopback_only():
    env = {k: v for k, v in ENV.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    done = subprocess.run([sys.executable, "-c", SINGLE_PROCESS], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    listeners = json.loads(done.stdout.strip().splitlines()[-1])
    assert listeners, "the store and gloo should listen somewhere"
    exposed = [(ip, port) for ip, port in listeners if not _is_loopback(ip)]
    assert not exposed, f"listening beyond loopback: {exposed}"


@pytest.mark.slow
def test_single_process_training_listens_on_loopback_only(shards, tmp_path):
    run = subprocess.Popen([sys.executable, "-m", "xgem_dist.cli", "train", "--launcher", "local", "--shards", shards,
                            "--run-dir", str(tmp_path / "run"), "--steps", "1", "--set", "global_batch=4"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV)
    seen: set[tuple[int, str, int]] = set()
    deadline = time.monotonic() + 600
    while run.poll() is None and time.monotonic() < deadline:
        seen |= _listeners(_with_children([run.pid]))
        time.sleep(0.2)
    run.kill()
    assert run.wait() == 0, run.stderr.read()[-3000:]
    assert seen, "the training process should have listened (its store, gloo)"
    exposed = [entry for entry in seen if not _is_loopback(entry[1])]
    assert not exposed, f"listening beyond loopback: {exposed}"


PRIVATE_RAY = """
import json, os, psutil, ray
from xgem_dist.train.ray_launch import start_private_ray
start_private_ray()
try:
    started = {kind: [info.process.pid for info in infos]  # the processes this instance started
               for kind, infos in ray._private.worker._global_node.all_processes.items()}

    @ray.remote
    def worker_pid() -> int:
        return os.getpid()

    worker = ray.get(worker_pid.remote())  # a worker process is up and serving
    pids = {pid for pids in started.values() for pid in pids} | {worker, os.getpid()}
    for pid in list(pids):
        pids |= {child.pid for child in psutil.Process(pid).children(recursive=True)}
    listeners = []
    for pid in pids:
        try:
            listeners += [[pid, c.laddr.ip, c.laddr.port] for c in psutil.Process(pid).net_connections(kind="inet")
                          if c.status == psutil.CONN_LISTEN]
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    print(json.dumps({"started": started, "worker": worker, "listeners": listeners,
                      "node_ip": ray.util.get_node_ip_address()}))
finally:
    ray.shutdown()
"""


def test_the_private_ray_instance_listens_on_loopback_only():
    """In a process of its own: a Ray instance started in pytest's process would stay its driver's."""
    pytest.importorskip("ray")
    done = subprocess.run([sys.executable, "-c", PRIVATE_RAY], capture_output=True, text=True, env=ENV, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    started, worker = seen["started"], seen["worker"]
    listeners = {tuple(entry) for entry in seen["listeners"]}
    servers = {pid for pid, _, _ in listeners}
    assert {*started["gcs_server"], *started["raylet"], worker} <= servers, (started, listeners)
    exposed = [entry for entry in listeners if not _is_loopback(entry[1])]
    assert not exposed, f"listening beyond loopback: {exposed}"
    assert seen["node_ip"] == "127.0.0.1"
