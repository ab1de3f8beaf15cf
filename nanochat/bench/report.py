"""The E3 report: claims analysed from ``results.json``, ``REPORT.md`` and the plots."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from nanochat.bench.e3 import (
    BASELINE, CLAIM_COLLIDER_SPEEDUP, CLAIM_FULL_REDUCTION, CLAIM_GALORE_REDUCTION, CLAIM_MTP_EFFICIENCY,
    CLAIM_MUON8_REDUCTION, CLAIM_UTILISATION, COLLIDER_SPARSITY, REPORT_FILE, TARGET_COLLIDER_RATIO,
    TARGET_DATA_WAIT, TARGET_FULL_RATIO, TARGET_GALORE_RATIO, TARGET_LOSS_SLACK, TARGET_MUON8_RATIO,
    _OP_CATEGORIES, tokens_to_reach,
)


# ------------------------------------------------------------------------------- analysis


@dataclass
class ClaimRow:
    claim: str
    target: str
    measured: str
    verdict: str
    passed: bool | None  # None: not measured in this run


def analyse(results):
    """Derived numbers (ratios to the baseline and to float32 Muon, tokens-to-target) and the claim rows."""
    configs = results.get("configs", {})
    base = configs.get(BASELINE)
    derived = {}
    for name, r in configs.items():
        st = r["optimizer_state_bytes"]
        d = {"hidden_state_ratio": st["hidden"] / st["hidden_float32_muon"] if st["hidden_float32_muon"] else None}
        if base is not None:
            b_loss = base["final_val_loss"]
            d["val_loss_delta"] = (r["final_val_loss"] - b_loss) / b_loss
            reach = tokens_to_reach([(tok, v) for _, tok, v in r["val_curve"]], b_loss)
            own = tokens_to_reach([(tok, v) for _, tok, v in base["val_curve"]], b_loss)
            d["tokens_to_baseline_loss"] = reach
            d["tokens_ratio"] = reach / own if reach is not None and own else None
            d["total_state_ratio"] = st["total"] / base["optimizer_state_bytes"]["total"]
        derived[name] = d
    return {"configs": derived, "claims": [asdict(c) for c in claim_rows(results, derived)]}


def _pct(x):
    return f"{100 * x:.1f}%"


def claim_rows(results, derived):
    configs = results.get("configs", {})
    rows = []

    def unmeasured(claim, target, why):
        rows.append(ClaimRow(claim, target, f"not measured ({why})", "n/a", None))

    # MTP
    claim, target = "MTP: 15-20% data efficiency", "e3_mtp_only reaches e3_baseline's final validation CE in fewer tokens"
    d = derived.get("e3_mtp_only", {})
    if "tokens_ratio" not in d:
        unmeasured(claim, target, "needs e3_baseline and e3_mtp_only")
    elif d["tokens_ratio"] is None:
        total = configs["e3_mtp_only"]["tokens"]
        rows.append(ClaimRow(claim, target, f"not reached within {total:,} tokens (ratio > 1)",
                             "FAIL; claim not reproduced", False))
    else:
        r = d["tokens_ratio"]
        ok = r < 1.0
        rows.append(ClaimRow(claim, target, f"{r:.3f}x the baseline's tokens ({_pct(1 - r)} fewer)",
                             _verdict(ok, 1 - r >= CLAIM_MTP_EFFICIENCY), ok))
    # Collider
    col = results.get("collider")
    claim = "Collider: 35% faster backprop"
    target = f"backward time at {100 * COLLIDER_SPARSITY:g}% filtering <= {TARGET_COLLIDER_RATIO}x dense"
    if not col:
        unmeasured(claim, target, "collider micro-benchmark not run")
    else:
        r = col["backward_ratio"]
        ok = r <= TARGET_COLLIDER_RATIO
        rows.append(ClaimRow(claim, target, f"{r:.3f}x dense ({1 / r:.2f}x backward speed)",
                             _verdict(ok, 1 / r >= CLAIM_COLLIDER_SPEEDUP), ok))
    # Optimizer memory
    for preset, claim, limit, reduction in (
        ("e3_muon_8bit", "8-bit Muon: 86% memory reduction", TARGET_MUON8_RATIO, CLAIM_MUON8_REDUCTION),
        ("e3_galore2", "GaLore 2: 50-65% memory reduction", TARGET_GALORE_RATIO, CLAIM_GALORE_REDUCTION),
        ("e3_full", "combined: up to 95% memory reduction", TARGET_FULL_RATIO, CLAIM_FULL_REDUCTION),
    ):
        target = f"{preset} hidden-matrix optimizer state <= {limit}x float32 Muon's"
        d = derived.get(preset)
        if d is None or d.get("hidden_state_ratio") is None:
            unmeasured(claim, target, f"{preset} not run")
            continue
        r = d["hidden_state_ratio"]
        ok = r <= limit
        rows.append(ClaimRow(claim, target, f"{r:.3f}x ({_pct(1 - r)} reduction)", _verdict(ok, 1 - r >= reduction), ok))
    for preset in ("e3_muon_8bit", "e3_galore2", "e3_full"):
        claim = f"{preset}: no quality loss"
        target = f"final validation CE at most {100 * TARGET_LOSS_SLACK:g}% above e3_baseline's"
        d = derived.get(preset, {})
        if "val_loss_delta" not in d:
            unmeasured(claim, target, f"needs e3_baseline and {preset}")
            continue
        delta = d["val_loss_delta"]
        ok = delta <= TARGET_LOSS_SLACK
        rows.append(ClaimRow(claim, target, f"{configs[preset]['final_val_loss']:.4f} vs "
                             f"{configs[BASELINE]['final_val_loss']:.4f} ({100 * delta:+.2f}%)",
                             "PASS" if ok else "FAIL", ok))
    # Loader
    lo = results.get("loader")
    claim, target = "async loader: 90%+ utilisation", f"data wait < {100 * TARGET_DATA_WAIT:g}% of the step time"
    if not lo:
        unmeasured(claim, target, "loader micro-benchmark not run")
    else:
        w = lo["async"]["data_wait_fraction"]
        ok = w < TARGET_DATA_WAIT
        rows.append(ClaimRow(claim, target, f"{100 * w:.3f}% of the step waiting for data "
                             f"({_pct(1 - w)} utilisation); "
                             f"synchronous: {100 * lo['sync']['data_wait_fraction']:.3f}%",
                             _verdict(ok, 1 - w >= CLAIM_UTILISATION), ok))
    return rows


def _verdict(target_met, claim_reproduced):
    return ("PASS" if target_met else "FAIL") + ("; claim reproduced" if claim_reproduced else "; claim not reproduced")


# --------------------------------------------------------------------------------- report


def _mib(n):
    return "n/a" if n is None else f"{n / 2**20:.2f} MiB"


def _ms(s):
    return f"{1000 * s:.1f}"


def write_report(results, out_dir):
    """REPORT.md plus the PNG plots, all from ``results``."""
    out_dir = Path(out_dir)
    plots = write_plots(results, out_dir)
    (out_dir / REPORT_FILE).write_text(render_report(results, plots), encoding="utf-8")
    return out_dir / REPORT_FILE


def render_report(results, plots):
    a = analyse(results)
    env, plan = results["environment"], results["plan"]
    configs = results.get("configs", {})
    lines = ["# E3 benchmark report", ""]
    backend = next((r["backend"] for r in configs.values()), None) or (results.get("collider") or {}).get("backend")
    lines += [
        f"- date: {env['date']}; commit {env.get('git_commit')}{' (uncommitted changes)' if env.get('git_dirty') else ''}",
        f"- machine: {env.get('cpu')}, {env.get('cpus_usable')} usable CPUs; {env.get('platform')}; "
        f"Python {env['python']}, NumPy {env['numpy']}, Numba {env['numba']}",
        f"- backend: {backend}; scale {plan['scale']}; {'quick mode (a few steps: not a measurement of quality)' if plan['quick'] else 'full run'}",
        f"- load average (1, 5, 15 min) at start {_loads(env.get('load_average_start'))}, at end {_loads(env.get('load_average_end'))}",
        f"- suite wall time: {results.get('wall_seconds', float('nan')) / 60:.1f} min",
    ]
    if results.get("command"):
        lines.append(f"- command: `{results['command']}`")
    lines += ["", "## Claims", "", "| claim (system we replace) | our target | measured | verdict |", "|---|---|---|---|"]
    for c in a["claims"]:
        lines.append(f"| {c['claim']} | {c['target']} | {c['measured']} | {c['verdict']} |")
    if configs:
        lines += _config_section(results, a, plots)
    if results.get("collider"):
        lines += _collider_section(results["collider"], plots)
    if results.get("loader"):
        lines += _loader_section(results["loader"])
    lines += _notes(results)
    return "\n".join(lines) + "\n"


def _loads(v):
    return "n/a" if not v else ", ".join(f"{x:.2f}" for x in v)


def _config_section(results, a, plots):
    configs = results["configs"]
    any_cfg = next(iter(configs.values()))
    m = any_cfg["model"]
    lines = ["", "## Training runs", ""]
    lines.append(
        f"Model: dim {m['dim']}, {m['n_layers']} layers, {m['n_heads']} heads, FFN {m['ffn_hidden']}, "
        f"context {m['seq_len']}, vocabulary {m['vocab_size']}. Each run: {any_cfg['steps']} steps of "
        f"{any_cfg['tokens_per_step']:,} tokens ({any_cfg['tokens']:,} tokens); timing averages leave out the first "
        f"{results['plan']['warmup_steps']} steps.")
    lines += ["", "| config | params | final val CE | vs baseline | tokens to baseline's final CE | tokens/s | step ms "
              "| forward | backward | optimizer | data wait | hidden opt. state | vs fp32 Muon | all opt. state "
              "| peak RSS | GPU pool |", "|" + "---|" * 16]
    for name, r in configs.items():
        d = a["configs"][name]
        t = r["timing"]
        st = r["optimizer_state_bytes"]
        reach = d.get("tokens_to_baseline_loss")
        reach_s = "not reached" if reach is None and "tokens_ratio" in d else (
            f"{reach:,.0f} ({d['tokens_ratio']:.3f}x)" if reach is not None and d.get("tokens_ratio") else "n/a")
        delta = f"{100 * d['val_loss_delta']:+.2f}%" if "val_loss_delta" in d else "n/a"
        share = (lambda x: f"{_ms(x)} ({_pct(x / t['total'])})") if t["total"] > 0 else _ms
        lines.append(
            f"| {name} | {r['model']['parameters']:,} | {r['final_val_loss']:.4f} | {delta} | {reach_s} | "
            f"{r['tokens_per_sec']:,.0f} | {_ms(t['total'])} | {share(t['forward'])} | {share(t['backward'])} | "
            f"{share(t['optimizer'])} | {share(t['data_wait'])} | {_mib(st['hidden'])} | "
            f"{d['hidden_state_ratio']:.3f}x | {_mib(st['total'])} | {_mib(r['peak_rss_bytes'])} | {_mib(r['gpu_pool_bytes'])} |")
    lines += ["", "Validation CE is the main next-token loss only (MTP heads excluded), on the same fixed "
              "validation windows for every run. 'vs fp32 Muon' divides the hidden-matrix (Muon group) state by "
              "the measured state of a plain float32 Muon over the same matrices; 'all opt. state' adds the AdamW "
              "groups (embedding, norms). Skipped non-finite steps: "
              + ", ".join(f"{n} {r['skipped_steps']}" for n, r in configs.items()) + "."]
    names = sorted({k for r in configs.values() for k in r["optimizer_state_bytes"].get("hidden_by_array", {})})
    if names:
        lines += ["", "Hidden-matrix optimizer state by array (`buf`: float momentum, `qbuf`/`scales`: int8 momentum "
                  "and its block scales, `P`: GaLore projectors, `step`: step counters):", "",
                  "| config | " + " | ".join(names) + " | total |", "|" + "---|" * (len(names) + 2)]
        for name, r in configs.items():
            by = r["optimizer_state_bytes"]["hidden_by_array"]
            lines.append(f"| {name} | " + " | ".join(_mib(by[k]) if k in by else "-" for k in names)
                         + f" | {_mib(r['optimizer_state_bytes']['hidden'])} |")
    for key, title in (("val_loss", "Validation loss vs tokens"), ("step_time", "Time per step")):
        if key in plots:
            lines += ["", f"![{title}]({plots[key]})"]
    return lines


def _collider_section(col, plots):
    med = col["median"]
    lines = ["", "## Collider micro-benchmark", ""]
    lines.append(
        f"e3_baseline model, {col['tokens_per_batch']:,} tokens per batch, {100 * col['sparsity']:g}% of each sequence "
        f"filtered (kept fraction {col['kept_fraction']:.3f}), {col['reps']} repetitions per mode on the same batches "
        f"(medians, range in brackets), backend {col['backend']}.")
    lines += ["", "| | dense | filtered | ratio of medians |", "|---|---|---|---|"]
    for k in ("forward", "backward"):
        cells = [f"{_ms(med[m][k])} [{_ms(min(col['times'][m][k]))}-{_ms(max(col['times'][m][k]))}]" for m in ("dense", "sparse")]
        lines.append(f"| {k} ms | {cells[0]} | {cells[1]} | {med['sparse'][k] / med['dense'][k]:.3f}x |")
    prof = col["profile"]
    cats = sorted(set(prof["dense"]) | set(prof["sparse"]), key=lambda c: -prof["dense"].get(c, 0.0))
    dense_total = sum(prof["dense"].values())
    lines += ["", f"Backward split by op (median over {col['profile_reps']} profiled pass(es) per mode; each op's "
              "backward timed on its own, device-synchronised):", "",
              "| op | dense ms | share of dense | filtered ms | ratio |", "|---|---|---|---|---|"]
    for c in cats:
        dv, sv = prof["dense"].get(c, 0.0), prof["sparse"].get(c, 0.0)
        ratio = f"{sv / dv:.3f}x" if dv > 0 else "n/a"
        lines.append(f"| {c} | {_ms(dv)} | {_pct(dv / dense_total) if dense_total else 'n/a'} | {_ms(sv)} | {ratio} |")
    filtered = list(_OP_CATEGORIES.values())  # the ops whose backward runs on the kept rows only
    ms_of = {m: sum(prof[m].get(c, 0.0) for c in filtered) for m in ("dense", "sparse")}
    rest_d = dense_total - ms_of["dense"]
    rest_s = sum(prof["sparse"].values()) - ms_of["sparse"]
    lines += ["", f"Only the BitLinear and LM-head backwards run on the kept rows: together they go from "
              f"{_ms(ms_of['dense'])} ms to {_ms(ms_of['sparse'])} ms, while every other op (attention, norms, the "
              f"embedding gather, cross-entropy) stays dense: {_ms(rest_d)} ms vs {_ms(rest_s)} ms."]
    if "collider" in plots:
        lines += ["", f"![Collider backward split]({plots['collider']})"]
    return lines


def _loader_section(lo):
    lines = ["", "## Data loader micro-benchmark", ""]
    lines.append(f"e3_baseline training steps, {lo['steps']} timed steps per loader after one warm-up step; async loader "
                 f"with {lo['workers']} worker(s) and {lo['prefetch']} batches of prefetch. Building one batch from the "
                 f"token memmap takes {1e6 * lo['batch_build_seconds']:.1f} us.")
    lines += ["", "| loader | data wait ms/step | step ms | data-wait fraction |", "|---|---|---|---|"]
    for mode in ("sync", "async"):
        r = lo[mode]
        lines.append(f"| {mode} | {_ms(r['data_wait_seconds'] / lo['steps'])} | {_ms(r['step_seconds'] / lo['steps'])} | "
                     f"{100 * r['data_wait_fraction']:.3f}% |")
    return lines


def _notes(results):
    return ["", "## How each number is measured", "",
            "- Every run trains the same model from the same initialisation on the same batches; only the preset's "
            "optimizer and MTP settings differ. "
            + ("This run used --in-process: every part ran in one process, so peak RSS is cumulative."
               if results["plan"].get("in_process") else "Each training run and micro-benchmark runs in a fresh process."),
            "- Step time split: wall-clock seconds of the trainer's phases (data wait, forward, backward, optimizer "
            "including clipping), device-synchronised; tokens/s = tokens per step / mean step time.",
            "- Optimizer state: the sum of `nbytes` of every state array (moments, int8 buffers and scales, GaLore "
            "projectors, step counters) after training. The float32 Muon reference is a plain Muon allocated over "
            "matrices of the same shapes and stepped once, then measured the same way.",
            "- Tokens to the baseline's final CE: the first point where a run's validation curve reaches that value, "
            "interpolated linearly between evaluations; the ratio divides by the baseline's own tokens to it.",
            "- Peak RSS: the process's `ru_maxrss` at the end of training. GPU pool: bytes held by CuPy's memory "
            "pool at the end of training (the pool keeps freed blocks, so this is its high-water mark).",
            "- Method and design notes: docs/e3.md."]


def write_plots(results, out_dir):
    """PNG plots next to the report; returns {key: file name}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    plots = {}
    configs = results.get("configs", {})
    if configs:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for name, r in configs.items():
            curve = np.asarray([(tok, v) for _, tok, v in r["val_curve"]], dtype=float)
            ax.plot(curve[:, 0], curve[:, 1], marker="o", markersize=3, label=name)
        if BASELINE in configs:
            ax.axhline(configs[BASELINE]["final_val_loss"], color="gray", linestyle="--", linewidth=0.8,
                       label="baseline final")
        ax.set_xlabel("training tokens")
        ax.set_ylabel("validation CE (main head)")
        ax.set_title("E3: validation loss vs tokens")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out_dir / "e3_val_loss.png", dpi=120)
        plt.close(fig)
        plots["val_loss"] = "e3_val_loss.png"

        fig, ax = plt.subplots(figsize=(7, 0.6 * len(configs) + 1.5))
        names = list(configs)
        left = np.zeros(len(names))
        parts = ("forward", "backward", "optimizer", "data_wait")
        for part in parts + ("other",):
            if part == "other":
                vals = np.array([max(0.0, configs[n]["timing"]["total"] - sum(configs[n]["timing"][p] for p in parts))
                                 for n in names])
            else:
                vals = np.array([configs[n]["timing"][part] for n in names])
            ax.barh(names, 1000 * vals, left=1000 * left, label=part.replace("_", " "))
            left += vals
        ax.invert_yaxis()
        ax.set_xlabel("ms per step")
        ax.set_title("E3: time split per step")
        ax.legend(loc="lower right", fontsize=8)
        fig.tight_layout()
        fig.savefig(out_dir / "e3_step_time.png", dpi=120)
        plt.close(fig)
        plots["step_time"] = "e3_step_time.png"
    col = results.get("collider")
    if col:
        prof = col["profile"]
        cats = sorted(set(prof["dense"]) | set(prof["sparse"]), key=lambda c: -prof["dense"].get(c, 0.0))[:10]
        y = np.arange(len(cats))
        fig, ax = plt.subplots(figsize=(7, 0.45 * len(cats) + 1.5))
        ax.barh(y - 0.2, [1000 * prof["dense"].get(c, 0.0) for c in cats], height=0.4, label="dense")
        ax.barh(y + 0.2, [1000 * prof["sparse"].get(c, 0.0) for c in cats], height=0.4,
                label=f"{100 * col['sparsity']:g}% filtered")
        ax.set_yticks(y, cats)
        ax.invert_yaxis()
        ax.set_xlabel(f"backward ms (median of {col['profile_reps']} profiled pass(es))")
        ax.set_title("Collider: backward time by op")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out_dir / "e3_collider.png", dpi=120)
        plt.close(fig)
        plots["collider"] = "e3_collider.png"
    return plots
