"""`xgem-dist precompute` and `conditioning: precomputed`: deterministic, resumable, refuses mixed inputs, gives the
online losses; the empty-prompt embeddings are encoded once per run."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from xgem_dist.config import PrecomputeConfig
from xgem_dist.data.loader import ShardLoader
from xgem_dist.data.mimic import InputError
from xgem_dist.data.precompute import precompute

from .conftest import free_port

ENV = {**os.environ, "PYTHONWARNINGS": "ignore"}


@pytest.fixture(scope="module")
def conditioning(shards, source, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cond") / "cond"
    precompute(PrecomputeConfig(shards=shards, init_from=str(source), out=str(out), progress=False))
    return out


def _digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and "tokenizers" not in p.parts}


def _members(tar: Path) -> dict[str, dict[str, torch.Tensor]]:
    import tarfile

    from xgem_dist.data.precompute import sample_tensors

    with tarfile.open(tar) as f:
        return {m.name: sample_tensors(f.extractfile(m).read()) for m in f.getmembers()}


def test_precompute_is_deterministic_resumable_distributed_and_refuses_mixing(shards, source, conditioning, tmp_path):
    expected = _digests(conditioning)
    assert {"train/manifest.json", "train/empty.safetensors", "validate/manifest.json", "test/manifest.json"} <= set(
        expected)
    # interrupted: a shard and the manifest missing, a half-written file in staging -> the rerun gives the same bytes
    resumed = tmp_path / "resumed"
    subprocess.run(["cp", "-r", str(conditioning), str(resumed)], check=True)
    for name in ("train/manifest.json", "train/shard-000001.tar", "train/shard-000001.json"):
        (resumed / name).unlink()
    (resumed / "train" / ".staging").mkdir()
    (resumed / "train" / ".staging" / "shard-000001.tar.x").write_bytes(b"partial")
    precompute(PrecomputeConfig(shards=shards, init_from=str(source), out=str(resumed), progress=False))
    assert _digests(resumed) == expected
    # two ranks under torchrun, each its slice of the shards: the same bytes
    two = tmp_path / "two"
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
                    "127.0.0.1", "--master-port", str(free_port()), "-m", "xgem_dist.cli", "precompute", "--shards",
                    shards, "--init-from", str(source), "--out", str(two), "--tokenizers",
                    str(conditioning / "tokenizers"), "--no-progress"], check=True, env=ENV, capture_output=True,
                   timeout=300)
    # (bytes equal up to float rounding: torchrun runs each rank on one thread, CPU kernels reduce in other orders)
    assert set(_digests(two)) == set(expected)
    for tar in sorted(conditioning.rglob("*.tar")):
        ours, theirs = _members(tar), _members(two / tar.relative_to(conditioning))
        assert list(ours) == list(theirs)
        for key in ours:
            for name, value in ours[key].items():
                torch.testing.assert_close(theirs[key][name], value, rtol=1e-5, atol=1e-6)
    # other encoder weights into the same output: refused, naming what changed
    other = tmp_path / "other_init"
    subprocess.run(["cp", "-r", str(source), str(other)], check=True)
    from safetensors.torch import load_file, save_file

    vae = next((other / "vae").glob("*.safetensors"))
    tensors = load_file(vae)
    first = sorted(tensors)[0]
    tensors[first] = tensors[first] + 1
    save_file(tensors, vae)
    with pytest.raises(InputError, match="encoders_sha256"):
        precompute(PrecomputeConfig(shards=shards, init_from=str(other), out=str(resumed), progress=False))
    # the loader refuses conditioning of another image size and of another shard set's order
    with pytest.raises(InputError, match="image_size 64"):
        ShardLoader(shards, 4, 0, 1, 32, decoder="pil", prefetch=0, conditioning=str(conditioning))
    wrong = json.loads((conditioning / "validate" / "manifest.json").read_text())
    (resumed / "train" / "manifest.json").write_text(json.dumps(wrong))
    with pytest.raises(InputError, match="manifest hash"):
        ShardLoader(shards, 4, 0, 1, 64, decoder="pil", prefetch=0, conditioning=str(resumed))


def test_a_precomputed_batch_holds_what_the_online_path_encodes(shards, conditioning):
    """Same positions, same keys, presence as decoded; no JPEG is read."""
    online = ShardLoader(shards, 6, 0, 1, 64, decoder="pil", prefetch=0)
    pre = ShardLoader(shards, 6, 0, 1, 64, decoder="pil", prefetch=0, conditioning=str(conditioning))
    a, b = online.next_step()[0], pre.next_step()[0]
    assert a["key"] == b["key"] and a["seed"] == b["seed"] and a["report"] == b["report"]
    for view in ("frontal", "lateral"):
        assert torch.equal(a[f"{view}_present"], b[f"{view}_present"]) and view not in b
        assert b[f"vae_{view}_mean"].shape == (6, 4, 16, 16) and b[f"clip_{view}"].shape[0] == 6
    assert pre.state_dict() == online.state_dict()


def test_the_empty_prompt_embeddings_are_encoded_once_per_run(shards, source, conditioning):
    from xgem_dist.model.stages import apply_stage
    from xgem_dist.model.tokenizers import load_tokenizers
    from xgem_dist.model.xgem import build_xgem
    from xgem_dist.train.task import TrainingTask
    from xgem_dist.train.weights import load_init_weights

    tokenizers = load_tokenizers(conditioning / "tokenizers")
    reader = ShardLoader(shards, 4, 0, 1, 64, decoder="pil", prefetch=0, tokenizers=tokenizers)
    model = build_xgem("tiny")
    load_init_weights(model, str(source), 0, 1)
    apply_stage(model, "frontal")
    task = TrainingTask(model, "frontal", tokenizers, 4)
    calls = {"text": 0, "vision": 0}
    model.clip.text_model.register_forward_hook(lambda *_: calls.__setitem__("text", calls["text"] + 1))
    model.clip.vision_model.register_forward_hook(lambda *_: calls.__setitem__("vision", calls["vision"] + 1))
    with torch.no_grad():
        for _ in range(3):
            task(reader.next_step()[0])
    # per step one text forward (the reports) and one vision forward (the other view), plus one of each, once
    assert calls == {"text": 3 + 1, "vision": 3 + 1}


def _train(args: list[str]) -> dict[int, float]:
    run_dir = Path(args[args.index("--run-dir") + 1])
    result = subprocess.run([sys.executable, "-m", "xgem_dist.cli", "train", "--launcher", "local", *args],
                            capture_output=True, text=True, env=ENV, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    rows = [json.loads(line) for line in (run_dir / "steps.jsonl").read_text().splitlines()]
    return {row["step"]: row["train/loss"] for row in rows}


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["frontal", "text"])
def test_precomputed_conditioning_gives_the_online_losses(shards, source, conditioning, tmp_path, stage):
    """tiny, fp32, the same seeds: the per-step losses agree within 1e-5 relative. The precomputed run never
    builds the frozen encoders (none in its checkpoint); its export holds them as the online run's does (from
    init_from, bit-identical)."""
    from safetensors.torch import load_file

    from xgem_dist.train.weights import export
    from xgem_dist.train.zero_checkpoint import ZeroCheckpoint, newest_checkpoint

    common = ["--shards", shards, "--steps", "2", "--set", f"stage={stage}", "--set", "global_batch=6",
              "--set", "precision=fp32", "--set", f"init_from={source}", "--set",
              f"tokenizers={conditioning / 'tokenizers'}", "--set", "profile_flops=false"]
    online = _train([*common, "--run-dir", str(tmp_path / "online")])
    pre = _train([*common, "--run-dir", str(tmp_path / "pre"), "--set", "conditioning=precomputed",
                  "--set", f"conditioning_shards={conditioning}"])
    assert sorted(online) == sorted(pre) == [1, 2]
    worst = max(abs(online[s] - pre[s]) / abs(online[s]) for s in online)
    print(f"{stage}: worst relative per-step loss difference, precomputed vs online: {worst:.2e}")
    assert worst < 1e-5, (online, pre)
    saved = ZeroCheckpoint(newest_checkpoint(tmp_path / "pre")).names()
    assert saved and not [n for n in saved if n.split(".")[1] in ("vae", "clip", "optimus")]
    exported = [export(tmp_path / run, tmp_path / f"{run}-export") for run in ("online", "pre")]
    for component in ("vae", "clip", "optimus"):
        (online_file,), (pre_file,) = (sorted((f / component).glob("*.safetensors")) for f in exported)
        a, b = load_file(online_file), load_file(pre_file)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), component
