"""Run logs: a JSONL metrics file, TensorBoard event files (tensorboardX), a loss-curve PNG.

Every record is one JSON object per line with a ``kind`` and a ``step`` (optimizer updates
applied so far) and ``tokens`` (training tokens behind them):

- ``train`` (every ``log_every`` steps): ``loss`` (total, with MTP and MoE terms), ``ce`` (main
  next-token loss), ``mtp``, ``moe_aux``, ``grad_norm`` (before clipping), ``lr`` (Muon rate),
  ``lr_multiplier``, ``tokens_per_sec``, ``data_wait_frac``, ``time_forward``/``time_backward``/
  ``time_optimizer``/``time_data_wait``/``time_step`` (seconds per step over the window),
  ``loader_wait_total``, ``expert_load`` (per MoE layer, token slots per expert),
  ``kept_fraction`` (Collider: the fraction of tokens whose gradients the backward ran on; 1.0
  without Collider) and, with mHC, ``composite_gain``.
- ``val``: ``val_loss`` (mean main CE over the validation windows).
- ``skip``: a non-finite step that was not applied: ``loss``, ``grad_norm``, ``nonfinite_in_row``.
- ``summary`` (end of a ``train()`` call): ``skipped_steps``, ``interrupted``, ``seconds``, ``val_loss``.

TensorBoard mirrors the train and val numbers under the SPEC section 7 tags (``TB_TAGS``); MoE
load goes to ``moe/expert_load/layer{i}/expert{e}`` as the fraction of that layer's token slots.
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
    "kept_fraction": "collider/kept_fraction",
}


class MetricsLogger:
    """Appends records to ``metrics.jsonl`` and mirrors numbers to TensorBoard when available."""

    def __init__(self, out_dir, tensorboard=True):
        self.path = Path(out_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # A crash can leave a half-written last line; start a resumed run's records on a fresh one.
        needs_newline = self.path.exists() and self.path.stat().st_size > 0 and _last_byte(self.path) != b"\n"
        self._fh = open(self.path, "a", encoding="utf-8")
        if needs_newline:
            self._fh.write("\n")
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
        if self.tb is None or record.get("kind") not in ("train", "val") or "step" not in record:
            return  # skipped steps and summaries stay out of the curves
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
        """Flush and close the JSONL file and the TensorBoard writer; idempotent."""
        if not self._fh.closed:
            self._fh.close()
        if self.tb is not None:
            self.tb.close()
            self.tb = None


def _last_byte(path):
    with open(path, "rb") as fh:
        fh.seek(-1, 2)
        return fh.read(1)


def _jsonable(v):
    if hasattr(v, "tolist"):
        return v.tolist()
    return str(v)


def read_metrics(path, skip_bad_lines=False):
    """Records of a ``metrics.jsonl`` (or of the one in a run directory), in file order.

    A line that is not a JSON object raises ValueError naming the file and line, unless
    ``skip_bad_lines`` (used for plotting: a crash can leave one half-written line).
    """
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    records = []
    with open(path, encoding="utf-8", errors="replace") as fh:
        for n, line in enumerate(fh, 1):
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                if skip_bad_lines:
                    continue
                raise ValueError(f"{path}: line {n} is not valid JSON ({exc.msg})") from None
            if not isinstance(record, dict):
                if skip_bad_lines:
                    continue
                raise ValueError(f"{path}: line {n} is not a JSON object")
            records.append(record)
    return records


def _latest_per_step(records, kind, *keys):
    """Records of one kind that carry ``keys``, the last one per step (a resumed run re-logs
    the steps after its checkpoint), sorted by step."""
    by_step = {}
    for r in records:
        if r.get("kind") == kind and isinstance(r.get("step"), (int, float)) and all(
                isinstance(r.get(k), (int, float)) for k in keys):
            by_step[r["step"]] = r
    return [by_step[s] for s in sorted(by_step)]


def plot_losses(metrics_path, png_path, title=None):
    """Training CE (and MTP/total when present) and validation loss against tokens seen."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path, skip_bad_lines=True)
    train = _latest_per_step(records, "train", "tokens", "ce")
    val = _latest_per_step(records, "val", "tokens", "val_loss")
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    if train:
        ax.plot([r["tokens"] for r in train], [r["ce"] for r in train], label="train CE", lw=1.2)
        if any(r.get("mtp") for r in train):
            ax.plot([r["tokens"] for r in train], [r.get("loss", float("nan")) for r in train],
                    label="train total (with MTP)", lw=0.8, alpha=0.7)
    if val:
        ax.plot([r["tokens"] for r in val], [r["val_loss"] for r in val], "o-", label="validation", lw=1.5)
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title or "loss")
    ax.grid(alpha=0.3)
    if train or val:
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no training records yet", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)
    return Path(png_path)


def run_title(run_dir):
    """The loss plot's title, the same for the end of training and ``train plot``: the run
    directory's name plus the model shape and backend of its newest checkpoint (just the name
    when no checkpoint can be read)."""
    import json as _json

    from nanochat.io.checkpoint import list_checkpoints

    run = Path(run_dir).resolve()
    try:
        checkpoints = list_checkpoints(run / "checkpoints")
        if not checkpoints:
            return run.name
        newest = checkpoints[-1]
        model = _toml_loads((newest / "config.toml").read_text(encoding="utf-8")).get("model", {})
        backend = _json.loads((newest / "state.json").read_text(encoding="utf-8")).get("backend")
        shape = f"{int(model['dim'])}d x {int(model['n_layers'])} layers"
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return run.name
    return f"{run.name}: {shape}" + (f", {backend} backend" if isinstance(backend, str) and backend else "")


def tensorboard_hint(tb_dir):
    """How to view ``tb_dir``: the ``tensorboard`` command when the viewer is installed (on PATH,
    or next to this Python), else the command plus how to install the viewer."""
    import shutil
    import sys

    on_path = shutil.which("tensorboard")
    beside = Path(sys.executable).parent / "tensorboard"
    if on_path:
        return f"tensorboard --logdir {tb_dir}"
    if beside.is_file():
        return f"{beside} --logdir {tb_dir}"
    return (f"tensorboard --logdir {tb_dir}  (the viewer is not installed: "
            f"pip install tensorboard, or pip install -e '.[tensorboard]')")


def _toml_loads(text):
    import sys

    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        import tomli as tomllib
    return tomllib.loads(text)
