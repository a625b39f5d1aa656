"""Profile outputs: TensorBoard scalars, JSONL, a compact table, and a self-contained HTML report with plots
(throughput over time, step breakdown, GPU utilisation)."""

from __future__ import annotations

import base64
import io
import json
import statistics
from pathlib import Path

from .metrics import PHASES


class MetricSinks:
    """Per-step figures to TensorBoard (SummaryWriter) and a JSONL file; rank 0 only."""

    def __init__(self, folder: str | Path):
        from torch.utils.tensorboard import SummaryWriter

        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.writer = SummaryWriter(str(self.folder / "tensorboard"))
        self.jsonl = open(self.folder / "steps.jsonl", "a")

    def write(self, step: int, figures: dict) -> None:
        for name, value in figures.items():
            if isinstance(value, (int, float)):
                self.writer.add_scalar(name, value, step)
        self.jsonl.write(json.dumps({"step": step, **figures}) + "\n")
        self.jsonl.flush()

    def images(self, name: str, images, step: int) -> None:
        """images [N, 1, H, W] in [0, 1]."""
        self.writer.add_images(name, images, step, dataformats="NCHW")

    def text(self, name: str, text: str, step: int) -> None:
        self.writer.add_text(name, text, step)

    def close(self) -> None:
        self.writer.close()
        self.jsonl.close()


def summarise(steps: list[dict], skip_first: int = 1) -> dict:
    """The median step by step time (the first step, with its warm-up, left out when there are others), so
    that its breakdown adds up; plus the medians of throughput over all those steps."""
    rows = steps[skip_first:] if len(steps) > skip_first else steps
    ordered = sorted(rows, key=lambda r: r["profile/step_s"])
    median_step = ordered[(len(ordered) - 1) // 2]
    summary = {k: v for k, v in median_step.items() if isinstance(v, (int, float)) and k != "step"}
    for key in ("profile/samples_per_s", "profile/images_per_s", "profile/tflops", "profile/mfu"):
        if key in median_step:
            summary[f"{key}/median_over_steps"] = statistics.median(r[key] for r in rows)
    summary["median_step"] = median_step["step"]
    return summary


def table(summary: dict) -> str:
    step = summary["profile/step_s"]
    lines = [f"step time {step * 1000:9.1f} ms   {summary['profile/samples_per_s']:8.2f} samples/s   "
             f"{summary['profile/images_per_s']:8.2f} images/s"]
    if "profile/tflops" in summary:
        mfu = summary.get("profile/mfu")
        lines.append(f"achieved {summary['profile/tflops']:.4g} TFLOP/s" + (f"   MFU {100 * mfu:5.1f} %" if mfu else
                                                                           "   MFU n/a (no peak for this device)"))
    for phase in (*PHASES, "other"):
        seconds = summary.get(f"profile/{phase}_s", 0.0)
        lines.append(f"  {phase:10s} {seconds * 1000:9.1f} ms  {100 * seconds / step:5.1f} %")
    return "\n".join(lines)


def _png(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode()


def html_report(path: str | Path, steps: list[dict], telemetry: list[dict], summary: dict, meta: dict) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images = []
    x = [s["step"] for s in steps]
    fig, ax = plt.subplots(figsize=(7, 3))
    ax.plot(x, [s["profile/images_per_s"] for s in steps], marker="o")
    ax.set(xlabel="step", ylabel="images/s", title="Throughput")
    images.append(_png(fig))
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 3))
    bottom = [0.0] * len(steps)
    for phase in (*PHASES, "other"):
        values = [s.get(f"profile/{phase}_s", 0.0) * 1000 for s in steps]
        ax.bar(x, values, bottom=bottom, label=phase)
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.set(xlabel="step", ylabel="ms", title="Step breakdown")
    ax.legend(fontsize=7, ncol=3)
    images.append(_png(fig))
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 3))
    t0 = telemetry[0]["time"] if telemetry else 0
    if telemetry and "gpu_util_percent" in telemetry[0]:
        ax.plot([t["time"] - t0 for t in telemetry], [t["gpu_util_percent"] for t in telemetry], label="GPU util %")
    ax.plot([t["time"] - t0 for t in telemetry if "host_cpu_percent" in t],
            [t["host_cpu_percent"] for t in telemetry if "host_cpu_percent" in t], label="host CPU %")
    ax.set(xlabel="s", ylabel="%", title="Utilisation", ylim=(0, 105))
    ax.legend(fontsize=7)
    images.append(_png(fig))
    plt.close(fig)

    gpu_note = telemetry[0].get("gpu") if telemetry else "no telemetry"
    body = "".join(f'<img src="data:image/png;base64,{img}">' for img in images)
    meta_rows = "".join(f"<tr><td>{k}</td><td>{v}</td></tr>" for k, v in meta.items())
    html = (f"<!doctype html><html><head><meta charset='utf-8'><title>xgem-dist profile</title></head><body>"
            f"<h1>xgem-dist profile</h1><table>{meta_rows}</table><pre>{table(summary)}</pre>"
            f"{'<p>GPU telemetry: ' + str(gpu_note) + '</p>' if isinstance(gpu_note, str) else ''}{body}</body></html>")
    path = Path(path)
    path.write_text(html)
    return path
