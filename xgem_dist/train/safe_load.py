"""Checkpoint files are read as data, never as code.

torch.load with weights_only=False unpickles arbitrary objects, so a crafted checkpoint file runs code
as the training user (on every worker, when checkpoints live in shared storage). DeepSpeed loads that
way (its checkpoint engine, load_checkpoint, the universal conversion). Every checkpoint read here goes
through `load_data`: weights_only=True with the few DeepSpeed types its files hold allowlisted, and an
error naming the file otherwise. `data_only_loads()` routes DeepSpeed's own torch.load calls through it;
`python -m xgem_dist.train.safe_load ARGS` runs DeepSpeed's ds_to_universal (ARGS are its own) that way.
"""

from __future__ import annotations

import functools
import importlib
import pickle
import re
import sys
from contextlib import contextmanager

import torch

# what DeepSpeed 0.19 pickles besides tensors and builtins (found by loading this project's checkpoints,
# ZeRO-2 and ZeRO-3, same-size and universal, with weights_only=True)
DEEPSPEED_TYPES = ("deepspeed.runtime.zero.config.ZeroStageEnum", "deepspeed.runtime.fp16.loss_scaler.LossScaler",
                   "deepspeed.utils.tensor_fragment.fragment_address")

_torch_load = torch.load


@functools.cache
def _allow_deepspeed_types() -> None:
    types = []
    for qualified in DEEPSPEED_TYPES:
        module, _, name = qualified.rpartition(".")
        types.append(getattr(importlib.import_module(module), name))
    torch.serialization.add_safe_globals(types)


def load_data(f, map_location=None, *args, weights_only: bool | None = None, **kwargs):
    """torch.load(f, ...) with weights_only=True whatever the caller asked; a file that is not plain data
    (or is damaged) is a ValueError naming it."""
    _allow_deepspeed_types()
    try:
        return _torch_load(f, map_location, *args, weights_only=True, **kwargs)
    except pickle.UnpicklingError as error:
        named = re.search(r"GLOBAL ([\w.]+)", str(error))
        reason = f"it names {named.group(1)}" if named else str(error).splitlines()[0]
        raise ValueError(f"{f}: refused to load this checkpoint file: it holds more than tensors, plain data and "
                         f"the allowed DeepSpeed types ({reason}), and loading it could run code. If you did not "
                         "write it, delete it (or its checkpoint folder) and resume from another checkpoint") from None
    except (RuntimeError, EOFError) as error:  # torch's zip reader: truncated or overwritten files
        raise ValueError(f"{f}: damaged checkpoint file ({str(error).splitlines()[0]}); delete its checkpoint "
                         "folder and resume from another checkpoint") from None


@contextmanager
def data_only_loads():
    """Within it, every torch.load (DeepSpeed's included) is `load_data`."""
    torch.load = load_data
    try:
        yield
    finally:
        torch.load = _torch_load


def _convert_to_universal() -> int:
    from deepspeed.checkpoint import ds_to_universal

    args = ds_to_universal.parse_arguments()
    with data_only_loads():
        try:
            ds_to_universal.main(args)
        except ValueError as error:
            print(f"xgem-dist: error: {error}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(_convert_to_universal())
