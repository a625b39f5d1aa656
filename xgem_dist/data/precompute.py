"""`xgem-dist precompute`: the frozen encoders' outputs for every sample of every split, as shards beside the image
shards, so that training with `conditioning: precomputed` neither runs nor needs those encoders.

Per sample (member `cond.safetensors`, fp32): the VAE posterior of each view (mean and log-variance: training
still draws the posterior sample from the sample's own seed), the CLIP embeddings of the report and of each view,
the Optimus posterior (mean, log-variance) and the views' presence as decoded. A missing view is encoded as the
blank image the online path would encode. Each source shard gives one output shard of the same name, keys and
order; each split folder gets its own manifest.json (naming the source manifest's hash, the encoder weights' hash,
the tokenizers' hash and the image size) and empty.safetensors (the empty-prompt embeddings).

Deterministic (samples encoded in fixed chunks per shard, tars with mtime 0 and a fixed owner: the same bytes on
the same device and thread count, the same values up to float rounding on any rank count), atomic (a shard
appears whole, with its entry file, or not at all), resumable (a rerun skips the shards whose entry file is there
and refuses output of another build), any fsspec URL. Under torchrun, rank r encodes the shards i with
i % world == r; rank 0 writes the manifests once every rank is done.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from collections.abc import Callable
from datetime import timedelta

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from tqdm import tqdm

from ..config import PrecomputeConfig
from ..model.encoders import clip_image_token, clip_text_token
from ..model.objectives import clip_pixels
from ..model.tokenizers import Tokenizers, load_tokenizers, train_small_tokenizers
from ..storage import Store
from .loader import VIEWS, ShardLoader, tokenize_reports
from .mimic import SPLITS, InputError
from .shard import MANIFEST, index_text


FORMAT = "xgem-dist-conditioning/1"
MEMBER = "cond.safetensors"
EMPTY = "empty.safetensors"
ENCODERS = ("vae", "clip", "optimus")
TOKENIZERS = "tokenizers"  # under --out: the small tokenizers trained for the tiny preset


def tokenizers_for(model: str, folder: str, train_reader: ShardLoader) -> Tokenizers:
    """The run's tokenizers: from `folder`, or (tiny preset only) small ones trained on the train split's reports,
    exactly as a training run on that split makes them."""
    if folder:
        return load_tokenizers(folder)
    if model != "tiny":
        raise ValueError(f"model {model!r} needs its real tokenizers: set tokenizers to a folder with clip/, bert/ "
                         "and gpt2/ (save_pretrained layout)")
    reports = train_reader.read_members([(ref, "report.txt") for ref in train_reader.samples])
    texts = [bytes(r).decode() for r in reports if r]
    return train_small_tokenizers([t for t in texts if t.strip()] or ["empty"])


def _shared_tokenizers(cfg: PrecomputeConfig, train_reader: ShardLoader, rank: int, barrier) -> Tokenizers:
    """cfg.tokenizers, or small ones trained once (rank 0) and saved to <out>/tokenizers for every rank and for the
    training run (`--set tokenizers=<out>/tokenizers`): their WordPiece ids differ from one training to another."""
    if cfg.tokenizers:
        return load_tokenizers(cfg.tokenizers)
    out = Store(cfg.out)
    if not out.is_local:
        raise ValueError("precompute to object storage needs --tokenizers (the small ones are saved under --out)")
    folder = os.path.join(out.path, TOKENIZERS)
    if rank == 0 and not os.path.isdir(folder):
        tokenizers_for(cfg.model, "", train_reader).save(folder + ".partial")
        os.replace(folder + ".partial", folder)
    barrier()
    return load_tokenizers(folder)


def tokenizers_sha256(tokenizers: Tokenizers) -> str:
    digest = hashlib.sha256()
    for name in ("clip", "bert"):
        # canonical JSON: the library writes its vocabularies in hash-map order, which differs between processes
        digest.update(json.dumps(json.loads(getattr(tokenizers, name).backend_tokenizer.to_str()), sort_keys=True)
                      .encode())
    return digest.hexdigest()


def encoders_sha256(init_from: str) -> str:
    """sha256 over the names and bytes of the VAE's, CLIP's and Optimus' tensors in an init_from source."""
    from ..train.weights import ComponentSource, parse_init_from

    sources = parse_init_from(init_from)
    missing = [c for c in ENCODERS if c not in sources]
    if missing:
        raise ValueError(f"init_from {init_from!r} names no {', '.join(missing)}: precomputed conditioning needs the "
                         "encoders' weights")
    digest = hashlib.sha256()
    for component in ENCODERS:
        source = ComponentSource(component, sources[component])
        for name in sorted(source.names()):
            tensor = source.get(name).contiguous()
            digest.update(f"{component}.{name}\0{tuple(tensor.shape)}\0{tensor.dtype}\0".encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@torch.no_grad()
def encode(model, batch: dict, device: torch.device) -> dict[str, torch.Tensor]:
    """The frozen encoders' outputs for one decoded batch, fp32, [B, ...] each (what the online path computes)."""
    size = model.clip.config.vision_config.image_size
    out = {"clip_report": clip_text_token(model.clip, batch["clip_ids"].to(device))[:, 0]}
    for view in VIEWS:
        images = batch[view].to(device)
        out[f"clip_{view}"] = clip_image_token(model.clip, clip_pixels(images, size))[:, 0]
        posterior = model.vae.encode((images * 2 - 1).expand(-1, 3, -1, -1)).latent_dist
        out[f"vae_{view}_mean"], out[f"vae_{view}_logvar"] = posterior.mean, posterior.logvar
        out[f"{view}_present"] = batch[f"{view}_present"].to(device, torch.uint8)
    out["optimus_mean"], out["optimus_logvar"] = model.optimus.encode(batch["bert_ids"].to(device),
                                                                      batch["bert_mask"].to(device))
    return {k: v.float().cpu() if v.is_floating_point() else v.cpu() for k, v in out.items()}


def sample_tensors(data: bytes | memoryview) -> dict[str, torch.Tensor]:
    return load_safetensors(bytes(data))


def stack_samples(members: list, shapes: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    """A micro-batch's conditioning from its samples' members; an absent one (a padded row) is zeros."""
    rows = [sample_tensors(m) if m else None for m in members]
    return {key: torch.stack([row[key] if row else torch.zeros(shape, dtype=torch.uint8 if key.endswith("_present")
                                                                 else torch.float32) for row in rows])
            for key, shape in shapes.items()}


def _tar(samples: list[tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, data in samples:
            info = tarfile.TarInfo(f"{key}.{MEMBER}")
            info.size, info.mtime, info.uname, info.gname, info.mode = len(data), 0, "xgem", "xgem", 0o644
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _distributed() -> tuple[int, int, Callable[[], None]]:
    """(rank, world size, barrier) from a torchrun environment, or a single process."""
    if int(os.environ.get("WORLD_SIZE", 1)) <= 1:
        return 0, 1, lambda: None
    if not torch.distributed.is_initialized():
        # the slowest rank may encode for hours while the others wait at the barrier
        torch.distributed.init_process_group("gloo", timeout=timedelta(hours=24))
    return torch.distributed.get_rank(), torch.distributed.get_world_size(), torch.distributed.barrier


def _splits(root: Store) -> list[tuple[str, Store]]:
    if root.exists(MANIFEST):
        return [("", root)]
    found = [(split, root.child(split)) for split in SPLITS if root.child(split).exists(MANIFEST)]
    if not found:
        raise InputError(f"{root.url}: no {MANIFEST} there nor in any of {', '.join(SPLITS)}/ (not a shard set)")
    return found


def _entry_name(shard_url: str) -> str:
    return shard_url[: -len(".tar")] + ".json"


def precompute(cfg: PrecomputeConfig) -> dict:
    """Encode every split of cfg.shards into cfg.out; returns {split: its manifest's summary} (rank 0's view)."""
    from ..model.xgem import build_xgem
    from ..train.weights import load_init_weights

    cfg.validate()
    rank, world, barrier = _distributed()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    splits = _splits(Store(cfg.shards))
    readers = {split: ShardLoader(store.url, 1, 0, 1, cfg.image_size, decoder="pil", prefetch=0)
               for split, store in splits}
    tokenizers = _shared_tokenizers(cfg, readers.get("train") or readers[splits[0][0]], rank, barrier)
    model = build_xgem(cfg.model)
    load_init_weights(model, cfg.init_from, 0, 1)
    model = model.to(device).eval()
    encoders = encoders_sha256(cfg.init_from)
    summary = {}
    for split, _ in splits:
        reader, out = readers[split], Store(cfg.out).child(split) if split else Store(cfg.out)
        reader.tokenizers = tokenizers
        build = {"format": FORMAT, "source_manifest": reader.manifest_hash, "encoders_sha256": encoders,
                 "tokenizers_sha256": tokenizers_sha256(tokenizers), "model": cfg.model, "image_size": cfg.image_size,
                 "decoder": "pil"}
        _check_build(out, build)
        entries = reader.manifest["shards"]
        by_shard: dict[str, list] = {}
        for ref in reader.samples:
            by_shard.setdefault(ref.shard, []).append(ref)
        mine = [e for i, e in enumerate(entries) if i % world == rank and not _done(out, e["url"], build)]
        bar = tqdm(total=sum(len(by_shard[e["url"]]) for e in mine), desc=f"precompute {split or 'split'} rank {rank}",
                   unit="sample", disable=not cfg.progress)
        for entry in mine:
            _encode_shard(model, reader, by_shard[entry["url"]], entry["url"], out, build, cfg.batch_size, device, bar)
        bar.close()
        barrier()
        if rank == 0:
            summary[split or "split"] = _finish(model, tokenizers, out, build, entries, device)
        barrier()
    return summary


def _check_build(out: Store, build: dict) -> None:
    for name in [MANIFEST] + ([n.rsplit("/", 1)[-1] for n in out.fs.glob(f"{out.path}/shard-*.json")]
                              if out.fs.exists(out.path) else []):
        if not out.exists(name):
            continue
        theirs = json.loads(out.read_bytes(name))["build"]
        if theirs != build:
            changed = ", ".join(f"{k}: {theirs.get(k)!r} -> {v!r}" for k, v in build.items() if theirs.get(k) != v)
            raise InputError(f"{out.url_of(name)} was computed from other shards, encoders or settings ({changed}); "
                             f"the outputs of two builds must not be mixed: use another --out or delete {out.url}")


def _done(out: Store, shard_url: str, build: dict) -> bool:
    name = _entry_name(shard_url)
    if not out.exists(name):
        return False
    entry = json.loads(out.read_bytes(name))["entry"]
    return out.exists(entry["url"]) and out.size(entry["url"]) == entry["bytes"]


def _encode_shard(model, reader: ShardLoader, refs: list, shard_url: str, out: Store, build: dict, batch_size: int,
                  device: torch.device, bar) -> None:
    samples = []
    for start in range(0, len(refs), batch_size):
        chunk = refs[start : start + batch_size]
        raw = {"key": [r.key for r in chunk], "members": reader.read_members(
            [(r, "report.txt") for r in chunk] + [(r, f"{v}.jpg") for v in VIEWS for r in chunk])}
        encoded = encode(model, reader._decode(raw), device)
        samples += [(key, save_safetensors({k: v[i].contiguous() for k, v in encoded.items()}))
                    for i, key in enumerate(raw["key"])]
        bar.update(len(chunk))
    data = _tar(samples)
    index = index_text(tarfile.open(fileobj=io.BytesIO(data)).getmembers()).encode()
    base = shard_url[: -len(".tar")]
    entry = {"url": shard_url, "index": base + ".idx", "samples": len(samples), "bytes": len(data),
             "sha256": hashlib.sha256(data).hexdigest(), "index_sha256": hashlib.sha256(index).hexdigest(),
             "first_key": samples[0][0], "last_key": samples[-1][0]}
    out.write_bytes(entry["index"], index)
    out.write_bytes(shard_url, data)
    out.write_bytes(_entry_name(shard_url), json.dumps({"build": build, "entry": entry}, sort_keys=True).encode())


def _finish(model, tokenizers: Tokenizers, out: Store, build: dict, source_entries: list, device) -> dict:
    """Rank 0 once every shard is written: the empty-prompt embeddings and the manifest (unless already there)."""
    if not out.exists(MANIFEST):
        missing = [e["url"] for e in source_entries if not out.exists(_entry_name(e["url"]))]
        if missing:
            raise RuntimeError(f"{out.url}: {len(missing)} shard(s) not written ({missing[:3]} ...); rerun to finish")
        entries = [json.loads(out.read_bytes(_entry_name(e["url"])))["entry"] for e in source_entries]
        first = _first_member(out, entries[0])
        ids = tokenize_reports(tokenizers, [""])["clip_ids"]
        empty = {k: v.float().cpu().contiguous() for k, v in empty_prompt_embeddings(model.clip, ids, device).items()}
        out.write_bytes(EMPTY, save_safetensors(empty))
        body = {"format": FORMAT, "build": build, "shards": entries,
                "shapes": {k: list(v.shape) for k, v in sorted(first.items())},
                "empty_sha256": hashlib.sha256(save_safetensors(empty)).hexdigest(),
                "num_samples": sum(e["samples"] for e in entries), "num_bytes": sum(e["bytes"] for e in entries)}
        out.write_bytes(MANIFEST, json.dumps(body, indent=1, sort_keys=True).encode())
        out.clear_staging()
    manifest = json.loads(out.read_bytes(MANIFEST))
    return {"num_samples": manifest["num_samples"], "shards": len(manifest["shards"]), "manifest": out.url_of(MANIFEST)}


def _first_member(out: Store, entry: dict) -> dict[str, torch.Tensor]:
    with out.open(entry["url"]) as f, tarfile.open(fileobj=f) as tar:
        return sample_tensors(tar.extractfile(tar.next()).read())


@torch.no_grad()
def empty_prompt_embeddings(clip, empty_report_ids: torch.Tensor, device: torch.device,
                            dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The empty-prompt embeddings [D]: CLIP of the empty report (its token ids [1, L]) and of the blank image."""
    side = clip.config.vision_config.image_size
    text = clip_text_token(clip, empty_report_ids.to(device))[0, 0]
    pixels = clip_pixels(torch.zeros(1, 1, side, side, device=device), side).to(dtype)
    return {"text": text, "image": clip_image_token(clip, pixels)[0, 0]}


def conditioning_store(url: str, split: str) -> Store:
    store = Store(url)
    return store if store.exists(MANIFEST) else store.child(split)


def load_empty(url: str, split: str) -> dict[str, torch.Tensor]:
    store = conditioning_store(url, split)
    if not store.exists(EMPTY):
        raise InputError(f"{store.url_of(EMPTY)} is missing: the precompute did not finish; rerun `xgem-dist "
                         "precompute` with the same arguments")
    return load_safetensors(store.read_bytes(EMPTY))


def conditioning_build(url: str, split: str) -> dict:
    return json.loads(conditioning_store(url, split).read_bytes(MANIFEST))["build"]
