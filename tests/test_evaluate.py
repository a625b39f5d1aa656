"""`xgem-dist evaluate`: the same eval.json at world size 1 and 2 (torchrun, gloo, loopback), resumed from its
cache without generating again; the figures against the libraries' own known cases; the message when
weights are missing. Feature extractor and label classifier: seeded random modules (below)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from xgem_dist.cli import main
from xgem_dist.generate import metrics
from xgem_dist.generate.evaluate import EvalConfig, evaluate

from .conftest import free_port
from .test_generate import tiny_export  # noqa: F401  (fixture)

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}


class _RandomCNN(nn.Module):
    """uint8 [B,3,H,W] -> [B, outputs], seeded weights: a stand-in for Inception / a CheXpert classifier."""

    def __init__(self, outputs: int):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Conv2d(3, 8, 5, stride=2), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2), nn.ReLU(),
                                     nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, outputs))
        self.num_features = outputs

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images.float() / 255)


def random_extractor(weights: str | None) -> nn.Module:
    return _RandomCNN(12)


def random_classifier(weights: str | None) -> nn.Module:
    return _RandomCNN(14)


def test_figures_match_the_libraries_known_cases():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(24, 64, 64), dtype=np.uint8)
    other = rng.integers(0, 32, size=(24, 64, 64), dtype=np.uint8)  # darker
    figures = metrics.distribution_figures(random_extractor(None), images, images, other, seed=0)
    assert abs(figures["generated"]["fid"]) < 1e-9 and abs(figures["generated"]["kid_mean"]) < 1e-5
    assert figures["real_floor"]["fid"] > 1e-3 and figures["real_floor"]["kid_mean"] > 1e-4  # another set is apart
    same = metrics.diversity([np.stack([images[0], images[0]]), np.stack([images[1], images[1]])])
    assert same["ms_ssim"] == pytest.approx(1.0) and same["pairs"] == 2
    reports = ["no acute cardiopulmonary process .", "small left pleural effusion and mild edema ."]
    assert metrics.text_figures(reports, reports) == pytest.approx(
        {"bleu_1": 1.0, "bleu_2": 1.0, "bleu_3": 1.0, "bleu_4": 1.0, "rouge_l": 1.0})
    unrelated = metrics.text_figures(["heart size normal ."] * 2, reports)
    assert unrelated["bleu_4"] == 0.0 and unrelated["rouge_l"] < 0.3
    labels = [{"Edema": 1}, {"Edema": 0}, {"Edema": -1}, {"Edema": None}, {"Edema": 1}]
    auroc = metrics.label_auroc(random_classifier(None), images[:5], labels)
    assert 0.0 <= auroc["Edema"] <= 1.0 and auroc["Atelectasis"] is None


def test_the_chest_xray_extractor_reads_a_local_transformers_folder(tmp_path):
    """rad-dino's path with a randomly initialised DINOv2 saved the way microsoft/rad-dino is laid out: features
    of a set against itself give FID ~0, of another set more; no folder is a clear message."""
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    config = Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                          image_size=28, patch_size=14)
    Dinov2Model(config).save_pretrained(tmp_path / "rad-dino")
    BitImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}).save_pretrained(
        tmp_path / "rad-dino")
    extractor, reason = metrics.feature_extractor("rad-dino", str(tmp_path / "rad-dino"))
    assert reason is None
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(8, 64, 64), dtype=np.uint8)
    other = rng.integers(0, 32, size=(8, 64, 64), dtype=np.uint8)
    figures = metrics.distribution_figures(extractor, images, images, other, seed=0)
    assert abs(figures["generated"]["fid"]) < 1e-6 and figures["real_floor"]["fid"] > 1e-3
    assert metrics.feature_extractor("rad-dino", None)[1].startswith("FID and KID with the chest X-ray extractor")
    with pytest.raises(ValueError, match="no such folder"):
        metrics.feature_extractor("rad-dino", str(tmp_path / "absent"))


def test_missing_weights_are_named(tiny_export, shards, tmp_path, capsys):  # noqa: F811
    model, reason = metrics.feature_extractor("inception", None)
    assert model is None and "FID and KID need the Inception weights as a local file (--feature-weights" in reason
    assert main(["evaluate", str(tiny_export), "--shards", shards, "--out", str(tmp_path / "e"),
                 "--feature-weights", str(tmp_path / "pt_inception.pth")]) == 2
    err = capsys.readouterr().err
    assert f"--feature-weights {tmp_path / 'pt_inception.pth'}: no such file" in err
    assert not (tmp_path / "e").exists()  # refused before generating anything

    # no weights: the figures that need them are named as not computed, the rest are computed
    report = evaluate(EvalConfig(model=str(tiny_export), shards=shards, out=str(tmp_path / "e"), combinations=("T->F",),
                                 samples=2, per_prompt=2, steps=2, image_size=64, progress=False))
    assert [r.split(" need")[0] for r in report["not_computed"]] == [
        "FID and KID", "label agreement (AUROC per CheXpert label)"]
    assert set(report["combinations"]["T->F"]["frontal"]) == {"diversity"}
    assert "FID and KID need the Inception weights" in capsys.readouterr().out


def _evaluate(model: Path, shards: str, out: Path, nproc: int) -> dict:
    args = [str(model), "--shards", shards, "--out", str(out), "--combinations", "T->F,F->T,T->F+L",
            "--samples", "2", "--per-prompt", "2", "--steps", "2", "--image-size", "64", "--batch-size", "2",
            "--max-report-tokens", "8", "--seed", "7", "--device", "cpu", "--no-progress",
            "--feature-extractor", "tests.test_evaluate:random_extractor",
            "--label-classifier", "tests.test_evaluate:random_classifier"]
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
                             "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
                             "-m", "xgem_dist.cli", "evaluate", *args], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and the ranks it started, by their group
        raise
    assert proc.returncode == 0, err[-4000:]
    return json.loads((out / "timing.json").read_text())


@pytest.mark.slow
def test_same_eval_json_at_world_sizes_1_and_2_and_resumed(tiny_export, shards, tmp_path):  # noqa: F811
    one = _evaluate(tiny_export, shards, tmp_path / "w1", 1)
    two = _evaluate(tiny_export, shards, tmp_path / "w2", 2)
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert one["samples_generated"] == two["samples_generated"] == 3 * 2 * 2  # combinations, studies, replicas
    report = (tmp_path / "w1" / "eval.json").read_bytes()
    assert report == (tmp_path / "w2" / "eval.json").read_bytes()
    figures = json.loads(report)
    assert figures["not_computed"] == []
    t2f = figures["combinations"]["T->F"]
    assert t2f["studies"] == 2 and set(t2f["frontal"]) == {"generated", "real_floor", "diversity", "label_auroc"}
    assert t2f["frontal"]["generated"]["fid"] > 0 and t2f["frontal"]["diversity"]["pairs"] == 2
    assert set(figures["combinations"]["F->T"]["text"]["generated"]) == {"bleu_1", "bleu_2", "bleu_3", "bleu_4",
                                                                         "rouge_l"}
    assert {"frontal", "lateral"} <= set(figures["combinations"]["T->F+L"])
    assert sorted(p.name for p in (tmp_path / "w1").glob("grid_*.png")) == [
        "grid_F-to-T.png", "grid_T-to-F+L.png", "grid_T-to-F.png"]
    page = (tmp_path / "w1" / "index.html").read_text()
    assert "data:image/png;base64," in page and "<script" not in page  # self-contained, static

    # resumed: everything comes from the cache, the same eval.json
    (tmp_path / "w2" / "eval.json").unlink()
    assert _evaluate(tiny_export, shards, tmp_path / "w2", 1)["samples_generated"] == 0
    assert (tmp_path / "w2" / "eval.json").read_bytes() == report
    with pytest.raises(ValueError, match="holds samples made with other settings"):
        evaluate(EvalConfig(model=str(tiny_export), shards=shards, out=str(tmp_path / "w2"), steps=3, image_size=64,
                            seed=7, progress=False))
