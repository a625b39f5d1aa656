"""Shards written to and verified from s3:// on a real S3-compatible server (moto) bound to 127.0.0.1."""

import json

from xgem_dist.cli import main as cli_main
from xgem_dist.data.shard import shard

from .conftest import shard_config


def test_shard_to_s3_then_verify_from_s3(demo, s3_endpoint, tmp_path, capsys):
    import boto3
    import fsspec

    fsspec.filesystem("s3").clear_instance_cache()
    summary = shard(shard_config(demo["root"], "s3://cxr/mimic", samples_per_shard=16, max_side=256))
    local = shard(shard_config(demo["root"], tmp_path / "local", samples_per_shard=16, max_side=256))
    assert summary == local

    client = boto3.client("s3", endpoint_url=s3_endpoint)
    keys = sorted(o["Key"] for o in client.list_objects_v2(Bucket="cxr", Prefix="mimic/")["Contents"])
    assert "mimic/train/manifest.json" in keys and "mimic/train/shard-000000.idx" in keys
    assert not [k for k in keys if ".staging" in k or k.endswith("partial.json")]
    for key in keys:
        body = client.get_object(Bucket="cxr", Key=key)["Body"].read()
        assert body == (tmp_path / "local" / key.removeprefix("mimic/")).read_bytes(), key

    assert cli_main(["verify-shards", "s3://cxr/mimic"]) == 0
    assert "OK: 3 manifest(s)" in capsys.readouterr().out
    manifest = json.loads(client.get_object(Bucket="cxr", Key="mimic/train/manifest.json")["Body"].read())
    client.delete_object(Bucket="cxr", Key="mimic/train/" + manifest["shards"][1]["url"])
    assert cli_main(["verify-shards", "s3://cxr/mimic/train"]) == 1
