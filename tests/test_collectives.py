"""The loop's collectives: one helper, every tensor on the engine's device (NCCL has no CPU path, so a CPU
tensor in an all_reduce stops a GPU run at its first step; gloo on CPU would not notice)."""

import ast
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import xgem_dist
from xgem_dist.train.collectives import Collectives

COLLECTIVES = {"all_reduce", "all_gather", "all_gather_object", "broadcast", "reduce_scatter", "all_to_all",
               "gather", "scatter", "reduce", "all_gather_into_tensor", "broadcast_object_list"}


@pytest.fixture
def seen(monkeypatch) -> list[torch.device]:
    """Stands in for a 2-rank process group and records the device of every tensor handed to it."""
    devices: list[torch.device] = []

    def all_reduce(tensor, op=None, group=None):
        devices.append(tensor.device)

    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    return devices


def test_tensors_are_made_on_the_engine_device_and_checked(seen):
    collectives = Collectives("meta", world_size=2)  # a device that is not the CPU, as a GPU would be
    collectives.sum(3.0)
    collectives.sum(torch.zeros((), device="meta"))
    with pytest.raises(RuntimeError, match="engine's device is meta"):
        collectives.sum(torch.zeros(()))  # what the loop used to hand NCCL: a CPU step loss
    assert seen == [torch.device("meta")] * 2
    assert Collectives("cpu", world_size=1).any(True) is True and not seen[2:]  # one rank: no collective


def test_only_the_helper_calls_collectives():
    """Every collective the loop, checkpointing and metrics make goes through Collectives (DeepSpeed's own are
    on its engine's device already)."""
    root = Path(xgem_dist.__file__).parent
    # DeepSpeed's zero.Init patched for 0-dim parameters: it broadcasts the parameter zero.Init allocated; the
    # replication of frozen parameters: DeepSpeed's own ZeRO-3 parameter gather (on the parameters' device)
    exempt = {("engine.py", "zero_init_param"), ("engine.py", "replicate")}
    offenders = []

    def visit(node: ast.AST, path: Path, function: str) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            function = node.name
        if (path.name, function) in exempt:
            return
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in COLLECTIVES:
            offenders.append(f"{path.name}:{node.lineno} {ast.unparse(node.func)}")
        for child in ast.iter_child_nodes(node):
            visit(child, path, function)

    for path in [*sorted((root / "train").glob("*.py")), *sorted((root / "profile").glob("*.py"))]:
        if path.name != "collectives.py":
            visit(ast.parse(path.read_text()), path, "")
    assert not offenders, offenders
