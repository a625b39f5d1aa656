"""`xgem-dist sample`: files per output, byte-identical for a seed whatever the batch, input checks; the
Sampler in bf16; load_model's contract (export folder with tokenizers/, --ema)."""

from __future__ import annotations

import pytest
import torch

from xgem_dist.cli import main
from xgem_dist.generate.load import load_model
from xgem_dist.generate.sample import make_sampler, sample_to_files
from xgem_dist.model.export import save_components
from xgem_dist.model.tokenizers import train_small_tokenizers
from xgem_dist.model.xgem import build_xgem

REPORTS = ["No acute cardiopulmonary process.", "Small left pleural effusion.", "Mild pulmonary edema.",
           "Right lower lobe pneumonia.", "Bibasilar atelectasis."]
FAST = {"steps": 2, "image_size": 64, "max_report_tokens": 8}


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory):
    """An export folder of the tiny preset (seeded random weights) with its tokenizers."""
    folder = tmp_path_factory.mktemp("model") / "export"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        save_components(build_xgem("tiny"), folder)
    train_small_tokenizers(REPORTS * 4).save(folder / "tokenizers")
    return folder


@pytest.fixture(scope="session")
def test_keys(shards):
    from xgem_dist.generate.studies import Studies

    studies = Studies(shards, "test", 64)
    return [k for k in sorted(studies.by_key) if studies.has(k, "frontal") and studies.has(k, "lateral")][:2]


def _contents(files) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in files}


def test_sample_from_shards_is_seeded_per_item(tiny_export, shards, test_keys, tmp_path):
    args = {"shards": shards, "keys": test_keys, "seed": 3, **FAST}
    batched = sample_to_files(tiny_export, "F->T+L", tmp_path / "a", batch_size=2, **args)
    names = {f"{k}__F-to-T+L__{m}" for k in test_keys for m in ("text.txt", "lateral.png")}
    assert {f.name for f in batched} == names
    # byte-identical for the seed, and an item's result does not depend on the others in its batch
    alone = sample_to_files(tiny_export, "F->T+L", tmp_path / "b", **{**args, "keys": test_keys[1:2]})
    assert len(alone) == 2 and _contents(alone).items() <= _contents(batched).items()
    other = sample_to_files(tiny_export, "F->T+L", tmp_path / "c", **{**args, "keys": test_keys[1:2], "seed": 4})
    png = f"{test_keys[1]}__F-to-T+L__lateral.png"
    assert _contents(other)[png] != _contents(batched)[png]


def test_sample_cli_given_inputs(tiny_export, tmp_path, capsys):
    report = tmp_path / "report.txt"
    report.write_text(REPORTS[1])
    common = [str(tiny_export), "--steps", "2", "--image-size", "64", "--seed", "5", "--device", "cpu"]
    assert main(["sample", *common, "--combination", "T->F", "--report", str(report),
                 "--out", str(tmp_path / "x")]) == 0
    made = sorted(p.name for p in (tmp_path / "x").iterdir())
    assert made == ["input__T-to-F__frontal.png"]
    capsys.readouterr()
    frontal = tmp_path / "x" / made[0]
    assert main(["sample", *common, "--combination", "F->T", "--report", "x", "--out", str(tmp_path / "z")]) == 2
    assert "F->T takes --frontal; missing --frontal; not used: --report" in capsys.readouterr().err
    assert main(["sample", *common, "--combination", "F->X", "--frontal", str(frontal),
                 "--out", str(tmp_path / "z")]) == 2
    assert "bad combination 'F->X'" in capsys.readouterr().err
    assert main(["sample", *common, "--combination", "L->T", "--lateral", str(report),
                 "--out", str(tmp_path / "z")]) == 2
    assert "not a readable JPEG" in capsys.readouterr().err


def test_sampler_runs_a_bf16_model(tiny_export):
    model, tokenizers = load_model(tiny_export, dtype="bf16")
    assert next(model.parameters()).dtype == torch.bfloat16
    sampler = make_sampler(model, tokenizers, steps=2, guidance=7.5, image_size=64, max_report_tokens=6)
    generators = [torch.Generator().manual_seed(i) for i in range(2)]
    out = sampler({"frontal": torch.rand(2, 1, 64, 64)}, ("text", "lateral"), generator=generators)
    assert out["lateral"].dtype == torch.float32 and out["lateral"].shape == (2, 1, 64, 64)
    assert out["latents"]["text"].dtype == torch.float32 and torch.isfinite(out["latents"]["text"]).all()
    assert len(out["text"]) == 2


def test_load_model_contract(tiny_export, tmp_path):
    with pytest.raises(ValueError, match="holds one set of weights; export the run with --ema"):
        load_model(tiny_export, ema=True)
    with pytest.raises(ValueError, match="no such model"):
        load_model(tmp_path / "absent")
    bare = tmp_path / "bare"
    save_components(build_xgem("tiny", device="cpu"), bare)
    with pytest.raises(ValueError, match="no usable tokenizers/ folder"):
        load_model(bare)
    with pytest.raises(ValueError, match="no complete checkpoint"):  # not an export: treated as a run dir
        load_model(tmp_path)
