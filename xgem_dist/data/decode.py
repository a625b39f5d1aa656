"""JPEG views -> [B, 1, S, S] float tensors in [0, 1], on the GPU with DALI (nvJPEG) or on the CPU.

Both decoders take a list of encoded JPEGs (None for a missing view) and return (images, present).
An unreadable JPEG is treated as missing, logged and counted, never replaced by another sample.
"""

from __future__ import annotations

import functools
import io
import logging
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image

from .sample import decode_at_eighth_scale, encode_jpeg

log = logging.getLogger(__name__)


BLANK_JPEG = encode_jpeg(Image.new("L", (8, 8)), quality=75)
DALI_INSTALL = "pip install 'xgem-dist[dali-cu12]' (CUDA 12) or 'xgem-dist[dali-cu13]' (CUDA 13)"


@functools.cache
def dali_missing() -> str | None:
    """Why NVIDIA DALI cannot be imported in this process, or None when it can."""
    try:
        import nvidia.dali  # noqa: F401
    except (ImportError, OSError) as e:  # OSError: a DALI build whose CUDA libraries are absent
        return f"{type(e).__name__}: {e}"
    return None


class PILDecoder:
    """CPU decode: JPEG DCT-domain downscaling (draft) to >= S, then a bilinear resize to S x S."""

    def __init__(self, size: int, threads: int = 2):
        self.size = size
        self.pool = ThreadPoolExecutor(max(1, threads)) if threads > 1 else None
        self.failures = 0

    def _one(self, data: bytes | None) -> np.ndarray | None:
        if not data:
            return None
        try:
            image = Image.open(io.BytesIO(data))
            image.draft("L", (self.size, self.size))
            image = image.convert("L").resize((self.size, self.size), Image.Resampling.BILINEAR)
            return np.asarray(image, dtype=np.uint8)
        except (OSError, ValueError, SyntaxError) as e:
            self.failures += 1
            log.warning("unreadable JPEG treated as a missing view (%d so far): %s", self.failures, e)
            return None

    def __call__(self, views: list[bytes | None]) -> tuple[torch.Tensor, torch.Tensor]:
        arrays = list(self.pool.map(self._one, views)) if self.pool else [self._one(v) for v in views]
        present = torch.tensor([a is not None for a in arrays])
        blank = np.zeros((self.size, self.size), dtype=np.uint8)
        stacked = np.stack([blank if a is None else a for a in arrays])
        return torch.from_numpy(stacked).unsqueeze(1).float().div_(255.0), present


class DALIDecoder:
    """nvJPEG through DALI: `fn.decoders.image(device="mixed", GRAY)` -> resize on the GPU (device="gpu"),
    or DALI's CPU operators (device="cpu"). Encoded bytes come in through external_source.

    The shards were checked when written, so the fast path sends every view straight to DALI; only a
    batch that DALI rejects is checked view by view on the CPU and decoded again without the bad ones."""

    def __init__(self, size: int, max_batch: int, device: str = "gpu", device_id: int = 0, threads: int = 2):
        self.size, self.max_batch, self.device = size, max_batch, device
        self.device_id, self.threads = device_id, threads
        self.failures = 0
        self.pipe = self._build()

    def _build(self):
        from nvidia.dali import fn, pipeline_def, types

        decode_device = "mixed" if self.device == "gpu" else "cpu"
        size = self.size

        @pipeline_def(batch_size=self.max_batch, num_threads=self.threads, prefetch_queue_depth=1,
                      device_id=self.device_id if self.device == "gpu" else None)
        def pipeline():
            # no_copy: DALI reads the encoded (memory-mapped) bytes in place; they outlive each synchronous run
            jpegs = fn.external_source(name="jpegs", dtype=types.UINT8, ndim=1, no_copy=True)
            images = fn.decoders.image(jpegs, device=decode_device, output_type=types.GRAY)
            return fn.resize(images, size=[size, size], interp_type=types.INTERP_LINEAR, antialias=True)

        pipe = pipeline()
        pipe.build()
        return pipe

    def _decodes(self, data: bytes) -> bool:
        try:
            decode_at_eighth_scale(Image.open(io.BytesIO(data)))
            return True
        except (OSError, ValueError, SyntaxError) as e:
            self.failures += 1
            log.warning("unreadable JPEG treated as a missing view (%d so far): %s", self.failures, e)
            return False

    def _run(self, chunk: list[bytes]) -> torch.Tensor:
        from nvidia.dali.plugin.pytorch import feed_ndarray

        self.pipe.feed_input("jpegs", [np.frombuffer(v, dtype=np.uint8) for v in chunk])
        (images,) = self.pipe.run()
        if self.device == "gpu":
            # the device named, not the calling thread's current one: the loader decodes in its own thread,
            # whose current device is cuda:0 on every rank of a node
            device = torch.device("cuda", self.device_id)
            dense = images.as_tensor()
            target = torch.empty(dense.shape(), dtype=torch.uint8, device=device)
            feed_ndarray(dense, target, cuda_stream=torch.cuda.current_stream(device))
            return target
        return torch.from_numpy(np.stack([np.array(t) for t in images]))

    def __call__(self, views: list[bytes | None]) -> tuple[torch.Tensor, torch.Tensor]:
        present = torch.tensor([bool(v) for v in views])
        outputs = []
        for start in range(0, len(views), self.max_batch):
            chunk = views[start : start + self.max_batch]
            try:
                outputs.append(self._run([v or BLANK_JPEG for v in chunk]))
            except RuntimeError:
                self.pipe = self._build()  # a failed run can leave the pipeline unusable
                for i, v in enumerate(chunk):
                    if v and not self._decodes(v):
                        present[start + i] = False
                ok = present[start : start + len(chunk)].tolist()
                outputs.append(self._run([v if keep else BLANK_JPEG for v, keep in zip(chunk, ok)]))
        batch = torch.cat(outputs).permute(0, 3, 1, 2).float().div_(255.0)  # N,H,W,1 -> N,1,H,W
        batch[~present.to(batch.device)] = 0.0
        return batch, present
