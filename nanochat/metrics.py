"""Run logs: a JSONL metrics file, TensorBoard event files (tensorboardX), a loss-curve PNG.

Every record is one JSON object per line with a ``kind`` ("train", "val", "skip", "summary")
and a ``step``. TensorBoard tags follow SPEC section 7.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

# metrics.jsonl field -> TensorBoard tag
TB_TAGS = {
    "loss": "loss/total",
    "ce": "loss/ce",
    "mtp": "loss/mtp",
    "val_loss": "loss/val",
    "lr": "train/lr",
    "grad_norm": "train/grad_norm",
    "tokens_per_sec": "perf/tokens_per_sec",
    "data_wait_frac": "perf/data_wait_frac",
    "composite_gain": "mhc/composite_gain",
}


class MetricsLogger:
    """Appends records to ``metrics.jsonl`` and mirrors numbers to TensorBoard when available."""

    def __init__(self, out_dir, tensorboard=True):
        self.path = Path(out_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "a", encoding="utf-8")
        self.tb = None
        self.tb_dir = None
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:
                SummaryWriter = None
            if SummaryWriter is not None:
                self.tb_dir = Path(out_dir) / "tensorboard"
                self.tb = SummaryWriter(str(self.tb_dir))

    def log(self, record):
        self._fh.write(json.dumps(record, sort_keys=True, default=_jsonable) + "\n")
        self._fh.flush()
        if self.tb is None or "step" not in record:
            return
        step = int(record["step"])
        for key, tag in TB_TAGS.items():
            value = record.get(key)
            if isinstance(value, (int, float)) and math.isfinite(value):
                self.tb.add_scalar(tag, value, step)
        load = record.get("expert_load")
        if load:
            for layer, counts in enumerate(load):
                total = max(1, sum(counts))
                for e, c in enumerate(counts):
                    self.tb.add_scalar(f"moe/expert_load/layer{layer}/expert{e}", c / total, step)

    def close(self):
        self._fh.close()
        if self.tb is not None:
            self.tb.close()


def _jsonable(v):
    if hasattr(v, "tolist"):
        return v.tolist()
    return str(v)


def read_metrics(path):
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    records = []
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            line = line.strip()
            if not line:
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}: line {n} is not valid JSON ({exc.msg})") from None
    return records


def plot_losses(metrics_path, png_path, title=None):
    """Training CE (and MTP/total when present) and validation loss against tokens seen."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    train = [r for r in records if r.get("kind") == "train"]
    val = [r for r in records if r.get("kind") == "val"]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    if train:
        ax.plot([r["tokens"] for r in train], [r["ce"] for r in train], label="train CE", lw=1.2)
        if any(r.get("mtp") for r in train):
            ax.plot([r["tokens"] for r in train], [r["loss"] for r in train], label="train total (with MTP)", lw=0.8, alpha=0.7)
    if val:
        ax.plot([r["tokens"] for r in val], [r["val_loss"] for r in val], "o-", label="validation", lw=1.5)
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title or "loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)
    return Path(png_path)
