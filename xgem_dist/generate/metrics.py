"""The evaluation's figures, from maintained implementations (torchmetrics): FID and KID over a pluggable
feature extractor, MS-SSIM among samples of one prompt, BLEU-1..4 and ROUGE-L, AUROC per CheXpert label.

Images arrive as [N, H, W] uint8 arrays (what is written to PNG). Every metric is built with
sync_on_compute=False: it runs on rank 0 over the gathered samples, never as a collective.
"""

from __future__ import annotations

import importlib
import itertools
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..data.mimic import CHEXPERT_LABELS

LOCAL = {"sync_on_compute": False}
INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"  # torch-fidelity's Inception weights
MS_SSIM_BETAS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)  # the MS-SSIM paper's scale weights
MS_SSIM_KERNEL = 11


def _factory(spec: str):
    module, _, name = spec.partition(":")
    if not name:
        raise ValueError(f"{spec!r}: expected MODULE:FUNCTION")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"{spec!r}: cannot import it ({e})") from e


def check_weights(flag: str, path: str | None) -> None:
    if path and not Path(path).is_file():
        raise ValueError(f"{flag} {path}: no such file (weights are read from local files only; nothing is "
                         "downloaded)")


class ChestXrayFeatures(nn.Module):
    """A transformers vision backbone from a local folder, made for chest X-rays: microsoft/rad-dino (the DINOv2
    that CheXGenBench computes its FID with) or any other. uint8 images [B, 3, H, W] -> the pooled (CLS)
    embedding [B, D], after the folder's own preprocessing (its preprocessor_config.json)."""

    def __init__(self, folder: str):
        super().__init__()
        from transformers import AutoImageProcessor, AutoModel

        self.backbone = AutoModel.from_pretrained(folder, local_files_only=True).eval()
        self.processor = AutoImageProcessor.from_pretrained(folder, local_files_only=True, backend="pil")

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pixels = self.processor(images=list(images.cpu()), return_tensors="pt")["pixel_values"]
        weight = next(self.backbone.parameters())
        return self.backbone(pixel_values=pixels.to(weight.device, weight.dtype)).pooler_output.float()


def feature_extractor(spec: str, weights: str | None) -> tuple[nn.Module | None, str | None]:
    """(the FID/KID feature module, None) or (None, why FID and KID cannot be computed)."""
    if spec == "rad-dino":
        if not weights:
            return None, ("FID and KID with the chest X-ray extractor need its local transformers folder "
                          "(--feature-weights, e.g. a download of microsoft/rad-dino); none was given and nothing is "
                          "downloaded at run time")
        if not Path(weights).is_dir():
            raise ValueError(f"--feature-weights {weights}: no such folder (rad-dino reads a transformers model "
                             "folder: config.json, weights, preprocessor_config.json)")
        return ChestXrayFeatures(weights), None
    check_weights("--feature-weights", weights)
    if spec != "inception":
        return _factory(spec)(weights or None).eval(), None
    if not weights:
        return None, (f"FID and KID need the Inception weights as a local file (--feature-weights, torch-fidelity's "
                      f"{INCEPTION_FILE}) or another extractor (--feature-extractor MODULE:FUNCTION); none was "
                      "given and nothing is downloaded at run time")
    try:
        from torchmetrics.image.fid import NoTrainInceptionV3

        return NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                  feature_extractor_weights_path=weights), None
    except (ImportError, ModuleNotFoundError) as e:
        raise ValueError(f"the Inception extractor needs torch-fidelity and torchvision: pip install "
                         f"'xgem-dist[inception]' ({e})") from e


def label_classifier(spec: str, weights: str | None) -> tuple[nn.Module | None, str | None]:
    check_weights("--classifier-weights", weights)
    if not spec:
        return None, ("label agreement (AUROC per CheXpert label) needs a classifier (--label-classifier "
                      "MODULE:FUNCTION with --classifier-weights); none was given")
    return _factory(spec)(weights or None).eval(), None


def _rgb(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images)).unsqueeze(1).expand(-1, 3, -1, -1).contiguous()


def _chunks(images: np.ndarray, size: int = 64):
    for i in range(0, len(images), size):
        yield _rgb(images[i : i + size])


@torch.no_grad()
def distribution_figures(extractor: nn.Module, real: np.ndarray, generated: np.ndarray, reference: np.ndarray,
                         seed: int) -> dict:
    """FID and KID of generated vs real, and of the reference split's real images vs the same real ones (the
    floor a perfect generator would reach with this many samples)."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    out = {}
    for name, other in (("generated", generated), ("real_floor", reference)):
        if len(other) < 2 or len(real) < 2:
            out[name] = None
            continue
        fid = FrechetInceptionDistance(feature=extractor, **LOCAL)
        kid = KernelInceptionDistance(feature=extractor, subsets=100, subset_size=min(1000, len(real), len(other)),
                                      **LOCAL)
        for metric in (fid, kid):
            for batch in _chunks(real):
                metric.update(batch, real=True)
            for batch in _chunks(other):
                metric.update(batch, real=False)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # KID draws its subsets from the global RNG
            kid_mean, kid_std = kid.compute()
        out[name] = {"fid": float(fid.compute()), "kid_mean": float(kid_mean), "kid_std": float(kid_std),
                     "count": len(other)}
    return out


def ms_ssim_betas(side: int) -> tuple[float, ...]:
    """The most scales (of 5) the image side allows with the 11-px kernel; fewer than 5: their weights renormalised."""
    scales = max(1, min(5, int(np.floor(np.log2((side - 1) / (MS_SSIM_KERNEL - 1)))) + 1))
    if scales == len(MS_SSIM_BETAS):
        return MS_SSIM_BETAS
    betas = np.array(MS_SSIM_BETAS[:scales])
    return tuple(float(b) for b in betas / betas.sum())


@torch.no_grad()
def diversity(samples: list[np.ndarray]) -> dict | None:
    """Mean MS-SSIM over every pair of samples of the same prompt (lower: more diverse); samples: one
    [K, H, W] array per prompt."""
    from torchmetrics.image import MultiScaleStructuralSimilarityIndexMeasure

    pairs = [(s[i], s[j]) for s in samples for i, j in itertools.combinations(range(len(s)), 2)]
    if not pairs:
        return None
    betas = ms_ssim_betas(pairs[0][0].shape[-1])
    metric = MultiScaleStructuralSimilarityIndexMeasure(data_range=1.0, kernel_size=MS_SSIM_KERNEL, betas=betas,
                                                        **LOCAL)
    as_float = lambda arrays: torch.from_numpy(np.stack(arrays)).float().div(255).unsqueeze(1)  # noqa: E731
    metric.update(as_float([a for a, _ in pairs]), as_float([b for _, b in pairs]))
    return {"ms_ssim": float(metric.compute()), "pairs": len(pairs), "scales": len(betas)}


def text_figures(generated: list[str], real: list[str]) -> dict:
    """Corpus BLEU-1..4 and mean ROUGE-L F1 of each generated report against its study's real one."""
    from torchmetrics.text import BLEUScore, ROUGEScore

    targets = [[t] for t in real]
    out = {f"bleu_{n}": float(BLEUScore(n_gram=n, **LOCAL)(generated, targets)) for n in range(1, 5)}
    out["rouge_l"] = float(ROUGEScore(rouge_keys="rougeL", **LOCAL)(generated, real)["rougeL_fmeasure"])
    return out


@torch.no_grad()
def label_auroc(classifier: nn.Module, images: np.ndarray, labels: list[dict]) -> dict:
    """AUROC per CheXpert label of the classifier's logits on `images` against the stored labels (1.0
    positive, 0.0 negative; uncertain and unlabelled studies left out); None where a class is absent."""
    from torchmetrics.classification import BinaryAUROC

    logits = torch.cat([classifier(batch).float() for batch in _chunks(images)])
    out = {}
    for j, name in enumerate(CHEXPERT_LABELS):
        rows = [(i, lab.get(name)) for i, lab in enumerate(labels) if lab.get(name) in (0.0, 1.0)]
        targets = torch.tensor([int(v) for _, v in rows])
        if len(rows) < 2 or targets.min() == targets.max():
            out[name] = None
            continue
        scores = logits[[i for i, _ in rows], j]
        out[name] = float(BinaryAUROC(**LOCAL)(scores, targets))
    return out
