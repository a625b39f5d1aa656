import contextlib
import os
import socket
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels run in its interpreter on the CPU; this must be set before any @triton.jit is applied
    os.environ.setdefault("TRITON_INTERPRET", "1")

from xgem_dist.config import ShardConfig
from xgem_dist.data.demo import make_demo

SHARED = Path(os.environ.get("XGEM_SHARED", Path(__file__).resolve().parents[2] / "shared"))


@pytest.fixture(scope="session")
def demo(tmp_path_factory) -> dict:
    """The demo dataset, made once per session (read-only for tests)."""
    return make_demo(tmp_path_factory.mktemp("demo") / "mimic")


@pytest.fixture(scope="session")
def demo_defects(demo) -> dict[str, str]:
    """defect name -> sample key"""
    return {defect: key for key, defect in demo["defects"].items()}


@pytest.fixture(scope="session")
def shards(demo, tmp_path_factory) -> str:
    """The demo's shards at 128 px, 16 samples a shard (read-only for tests)."""
    from xgem_dist.data.shard import shard

    out = tmp_path_factory.mktemp("shared") / "shards"
    shard(shard_config(demo["root"], out, max_side=128, samples_per_shard=16))
    return str(out)


def shard_config(root: str, out, **overrides) -> ShardConfig:
    return ShardConfig(images=str(root), reports=str(root), out=str(out), progress=False, **overrides)


@pytest.fixture(scope="session")
def realdata() -> Path:
    path = SHARED / "realdata"
    if not path.is_dir():
        pytest.skip(f"real data not found at {path} (it ships only beside the project's CI checkout)")
    return path


@contextlib.contextmanager
def loopback_ray_cluster(worker_ips: tuple[str, ...], nodes: dict | None = None):
    """A Ray cluster of loopback nodes (head on 127.0.0.2 without CPUs, one CPU per worker node) with this
    process connected; shut down through its own handle. nodes: filled with ip -> node."""
    import ray
    from ray.cluster_utils import Cluster

    os.environ["RAY_AUTH_MODE"] = "disabled"
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "node_ip_address": "127.0.0.2",
                                                            "include_dashboard": False})
    try:
        for ip in worker_ips:
            node = cluster.add_node(num_cpus=1, node_ip_address=ip)
            if nodes is not None:
                nodes[ip] = node
        cluster.wait_for_nodes()
        ray.init(address=cluster.address)
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint():
    server_mod = pytest.importorskip("moto.server")
    boto3 = pytest.importorskip("boto3")
    port = free_port()
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": endpoint}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="cxr")
        yield endpoint
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="session")
def source(tmp_path_factory) -> Path:
    """A seeded random tiny model (not the training runs' seed 0 init) in the component-folder layout; read only."""
    from xgem_dist.model.export import save_components
    from xgem_dist.model.xgem import build_xgem

    torch.manual_seed(1234)
    folder = tmp_path_factory.mktemp("source") / "tiny"
    save_components(build_xgem("tiny"), folder)
    return folder
