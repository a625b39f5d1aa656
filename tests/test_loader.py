"""The streaming loader: exactly-once order on any world size, resume across world sizes, the last-batch
policy, prefetch state, corrupt bytes, s3:// reads, and DALI's pipelines against the PIL path."""

import io
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from xgem_dist.data.loader import ShardLoader
from xgem_dist.data.shard import shard

from .conftest import shard_config


def test_the_demo_train_split_has_uneven_shards(shards):
    """The loader tests below rely on 51 train samples in shards of 16, 16, 16, 3."""
    sizes = [s["samples"] for s in json.loads((Path(shards) / "train" / "manifest.json").read_text())["shards"]]
    assert sizes == [16, 16, 16, 3]


def keys_of(loaders, steps):
    keys = []
    for _ in range(steps):
        keys += [k for loader in loaders for batch in loader.next_step() for k in batch["key"]]
    return keys


@pytest.mark.parametrize("world", [1, 2, 3])
def test_one_epoch_gives_every_sample_exactly_once(shards, world):
    loaders = [ShardLoader(shards, 6, rank, world, 32, prefetch=0) for rank in range(world)]
    seen = keys_of(loaders, loaders[0].steps_per_epoch)
    assert len(seen) == len(set(seen)) == 48  # 51 samples, global batch 6, the partial batch dropped
    all_keys = {s.key for s in loaders[0].samples}
    assert set(seen) <= all_keys and len(all_keys) == 51


def test_the_order_depends_on_seed_and_epoch_not_on_world_size(shards):
    one = keys_of([ShardLoader(shards, 6, 0, 1, 32, prefetch=0)], 8)
    three = keys_of([ShardLoader(shards, 6, r, 3, 32, prefetch=0) for r in range(3)], 8)
    assert one == three
    assert one[:6] != one[48:54]  # the second epoch is another permutation
    other_seed = keys_of([ShardLoader(shards, 6, 0, 1, 32, seed=7, prefetch=0)], 1)
    assert other_seed != one[:6]


def test_resume_at_another_world_size_continues_the_global_sequence(shards):
    reference = keys_of([ShardLoader(shards, 6, 0, 1, 32)], 12)  # crosses into the second epoch
    first = [ShardLoader(shards, 6, r, 2, 32) for r in range(2)]
    head = keys_of(first, 5)
    state = first[0].state_dict()
    assert state["consumed"] == 30 and state["epoch"] == 0
    for world in (3, 1):
        resumed = [ShardLoader(shards, 6, r, world, 32) for r in range(world)]
        for loader in resumed:
            loader.load_state_dict(state)
        assert head + keys_of(resumed, 7) == reference
    with pytest.raises(ValueError, match="does not divide"):
        ShardLoader(shards, 6, 0, 4, 32)
    with pytest.raises(ValueError, match="another manifest or seed"):
        ShardLoader(shards, 6, 0, 1, 32, seed=1).load_state_dict(state)


def test_state_is_what_was_delivered_not_what_was_prefetched(shards):
    loader = ShardLoader(shards, 6, 0, 1, 32, prefetch=3)
    loader.next_step()
    assert loader.state_dict()["consumed"] == 6
    assert loader._cursor[1] >= 6 and loader._queue.maxsize == 3  # the thread may be steps ahead
    loader.close()
    assert loader.state_dict()["consumed"] == 6


def test_pad_policy_marks_the_missing_rows_invalid(shards):
    loader = ShardLoader(shards, 12, 0, 1, 32, last_batch="pad", prefetch=0)
    assert loader.steps_per_epoch == 5
    batches = [b for _ in range(5) for b in loader.next_step()]
    last = batches[-1]
    assert last["valid"].tolist() == [True] * 3 + [False] * 9
    assert not last["frontal_present"][3:].any() and last["key"][3:] == [""] * 9
    delivered = [k for b in batches for k, ok in zip(b["key"], b["valid"]) if ok]
    assert len(delivered) == len(set(delivered)) == 51
    with pytest.raises(ValueError, match="drop"):
        ShardLoader(shards, 12, 0, 1, 32, last_batch="repeat")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_dali_gpu_without_a_gpu_says_what_to_use(shards):
    with pytest.raises(ValueError, match="dali-gpu needs a CUDA GPU; use dali-cpu or pil"):
        ShardLoader(shards, 12, 0, 1, 32, decoder="dali-gpu")


@pytest.fixture
def without_dali(monkeypatch):
    """DALI made unimportable for the test (and the per-process DALI check and warning reset around it)."""
    from xgem_dist.data import decode, loader

    monkeypatch.setitem(sys.modules, "nvidia.dali", None)
    decode.dali_missing.cache_clear()
    loader._warn_no_dali.cache_clear()
    yield
    decode.dali_missing.cache_clear()
    loader._warn_no_dali.cache_clear()


def test_auto_decoder_without_dali_on_a_gpu_falls_back_to_pil_with_one_warning(without_dali, caplog):
    from xgem_dist.data.decode import PILDecoder
    from xgem_dist.data.loader import choose_decoder, make_decoder

    with caplog.at_level("WARNING", logger="xgem_dist.data.loader"):
        assert choose_decoder("auto", cuda_device=0) == "pil"
        assert isinstance(make_decoder("auto", 32, 4, 1, cuda_device=0), PILDecoder)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1, warnings
    assert "DALI is not usable" in warnings[0] and "pip install 'xgem-dist[dali-cu12]'" in warnings[0]
    assert "'xgem-dist[dali-cu13]'" in warnings[0]
    assert choose_decoder("auto", cuda_device=None) == "pil"
    with pytest.raises(ValueError, match=r"decoder dali-cpu needs NVIDIA DALI .*pip install 'xgem-dist\[dali-cu12\]'"):
        make_decoder("dali-cpu", 32, 4, 1, cuda_device=None)


def test_auto_decoder_picks_dali_on_a_gpu_when_it_imports():
    pytest.importorskip("nvidia.dali")
    from xgem_dist.data.loader import choose_decoder

    assert choose_decoder("auto", cuda_device=0) == "dali-gpu" and choose_decoder("auto", None) == "pil"


def test_images_presence_and_reports(shards, demo_defects):
    loader = ShardLoader(shards, 51 - 3, 0, 1, 64, prefetch=0)
    (batch,) = loader.next_step()
    assert batch["frontal"].shape == (48, 1, 64, 64) and batch["frontal"].dtype == torch.float32
    assert 0 <= batch["frontal"].min() and batch["frontal"].max() <= 1
    for key, frontal, lateral in zip(batch["key"], batch["frontal_present"], batch["lateral_present"]):
        if key == demo_defects["frontal_less"]:
            assert not frontal and lateral
        if key == demo_defects["no_lateral"]:
            assert frontal and not lateral
    assert not batch["frontal"][~batch["frontal_present"]].any()
    assert all(isinstance(r, str) for r in batch["report"])


def test_corrupt_bytes_in_a_shard_are_a_counted_skip(shards, tmp_path, caplog):
    broken = tmp_path / "broken"
    shutil.copytree(shards, broken)
    loader = ShardLoader(str(broken), 48, 0, 1, 32, prefetch=0)
    victim = loader.samples[int(loader.order(0)[0])]
    offset, size = victim.members["frontal.jpg"]
    tar = broken / "train" / victim.shard
    data = bytearray(tar.read_bytes())
    data[offset + size // 3 : offset + size] = bytes(size - size // 3)  # zero the rest of the scan
    tar.write_bytes(bytes(data))
    (batch,) = loader.next_step()
    assert batch["key"][0] == victim.key and not batch["frontal_present"][0]
    assert loader.skipped_views == 1 and "unreadable JPEG" in caplog.text
    assert len(set(batch["key"])) == 48  # nothing repeated in its place


def test_a_shard_truncated_during_training_is_a_clear_error(shards, tmp_path):
    broken = tmp_path / "truncated"
    shutil.copytree(shards, broken)
    tar = broken / "train" / "shard-000001.tar"
    loader = ShardLoader(str(broken), 48, 0, 1, 32, prefetch=1)  # before: the start-up check would refuse it
    tar.write_bytes(tar.read_bytes()[:20000])
    with pytest.raises(OSError, match="shard-000001.tar: .* the index says .* truncated"):
        loader.next_step()  # raised in the prefetch thread, handed to the caller
    loader.close()


def test_reads_shards_through_s3(demo, s3_endpoint, tmp_path):
    for out in ("s3://cxr/loader", str(tmp_path / "local")):
        shard(shard_config(demo["root"], out, samples_per_shard=16, max_side=128))
    loader = ShardLoader("s3://cxr/loader", 6, 1, 2, 32, prefetch=1)
    local = ShardLoader(str(tmp_path / "local"), 6, 1, 2, 32, prefetch=1)
    assert len(loader.samples) == 51 and loader.samples == local.samples
    # every member, byte for byte, including the empty report.txt of the study without a report: an empty
    # range on S3 must not come back as the rest of the shard
    wanted = [(ref, ext) for ref in loader.samples for ext in ref.members]
    assert loader.read_members(wanted) == local.read_members(wanted)
    assert b"" in loader.read_members([(ref, "report.txt") for ref in loader.samples])
    assert [b["key"] for b in loader.next_step()] == [b["key"] for b in local.next_step()]
    (batch,), (local_batch,) = loader.next_step(), local.next_step()
    assert batch["report"] == local_batch["report"] and torch.equal(batch["frontal"], local_batch["frontal"])
    assert batch["frontal"].shape == (3, 1, 32, 32)
    loader.close()
    local.close()


@pytest.mark.parametrize("device", ["cpu", pytest.param("gpu", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="DALI's mixed (nvJPEG) decode needs CUDA"))])
def test_dali_pipeline_matches_the_pil_path(shards, device):
    pytest.importorskip("nvidia.dali")
    pil = ShardLoader(shards, 12, 0, 1, 64, decoder="pil", prefetch=0)
    dali = ShardLoader(shards, 12, 0, 1, 64, decoder=f"dali-{device}", prefetch=1)  # decodes in the loader's thread
    (a,), (b,) = pil.next_step(), dali.next_step()
    dali.close()
    assert a["key"] == b["key"]
    for view in ("frontal", "lateral"):
        assert b[view].device == (torch.device("cuda", torch.cuda.current_device()) if device == "gpu"
                                  else torch.device("cpu"))
        assert torch.equal(a[f"{view}_present"], b[f"{view}_present"])
        present = a[f"{view}_present"]
        difference = (a[view][present] - b[view][present].cpu()).abs()
        assert difference.mean() < 0.02 and difference.max() < 0.35, (view, float(difference.mean()))
        assert not b[view][~present].any()


def test_dali_decoder_survives_a_corrupt_jpeg():
    pytest.importorskip("nvidia.dali")
    from xgem_dist.data.decode import DALIDecoder

    good = io.BytesIO()
    Image.fromarray((np.arange(64 * 48) % 251).astype(np.uint8).reshape(48, 64)).save(good, format="JPEG")
    good = good.getvalue()
    decoder = DALIDecoder(32, max_batch=4, device="cpu")
    images, present = decoder([good, good[: len(good) // 2], None, b"not a jpeg"])
    assert present.tolist() == [True, False, False, False] and decoder.failures == 2
    assert images.shape == (4, 1, 32, 32) and images[0].any() and not images[1:].any()
