"""Collectives and bytes per training step, by type, from DeepSpeed's comms logger (`comms_logger` in the
DeepSpeed config; `enable_comms_logger` adds it). Counts what goes through deepspeed.comm: every ZeRO gather,
reduce-scatter and all-reduce of parameters and gradients, not the loop's own torch.distributed calls.

Bytes are the logger's message size per call (the size of the call's tensor argument: the gathered output of an
all-gather, the input of a reduce-scatter or all-reduce), summed over the step's calls on this rank.

    comms = CommsCounter()
    comms.begin_step()
    ...one optimizer step...
    figures = comms.end_step()  # {"comms/all_gather_into_tensor/calls": 12, ".../bytes": ..., "comms/calls": ...}
"""

from __future__ import annotations

from collections import defaultdict

COMMS_LOGGER = {"enabled": True, "prof_all": True, "verbose": False, "debug": False}


def enable_comms_logger(ds_config: dict) -> dict:
    """The DeepSpeed config with the comms logger on for every collective (nothing printed)."""
    return {**ds_config, "comms_logger": dict(COMMS_LOGGER)}


class CommsCounter:
    """Per-step totals of the comms logger's records. Inactive (end_step returns {}) unless the engine was
    initialised with the comms logger enabled."""

    def __init__(self):
        from deepspeed.comm.comm import comms_logger

        self._logger = comms_logger

    @property
    def active(self) -> bool:
        return bool(self._logger.enabled)

    def begin_step(self) -> None:
        self._logger.reset_data()

    def end_step(self) -> dict[str, int]:
        """{"comms/<op>/calls", "comms/<op>/bytes"} for each op type seen since begin_step, plus "comms/calls" and
        "comms/bytes" over all of them."""
        if not self.active:
            return {}
        calls: dict[str, int] = defaultdict(int)
        sent: dict[str, int] = defaultdict(int)
        for record, by_size in self._logger.get_raw_data().items():
            op = record.split("|")[0].strip()  # debug names carry the caller after a "|"
            for size, (count, *_) in by_size.items():
                calls[op] += count
                sent[op] += count * int(size)
        figures = {}
        for op in sorted(calls):
            figures[f"comms/{op}/calls"] = calls[op]
            figures[f"comms/{op}/bytes"] = sent[op]
        figures["comms/calls"] = sum(calls.values())
        figures["comms/bytes"] = sum(sent.values())
        self._logger.reset_data()
        return figures
