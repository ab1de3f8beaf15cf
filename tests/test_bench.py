"""The E3 benchmark suite: presets, measurement helpers, claim verdicts, and `--quick` end to end."""
from __future__ import annotations

import json

import numpy as np
import pytest

import backends
from nanochat import bench
from nanochat.config import load_config
from nanochat.model.gpt import Model
from nanochat.train.losses import compute_loss
from reference.autograd import Tensor

pytestmark = pytest.mark.trainer

# A model small enough for CI; GaLore projects every matrix here (min_dim 64, rank dim/4).
TINY = [
    "model.dim=64", "model.n_heads=2", "model.n_kv_heads=2", "model.ffn_hidden=128", "model.group_size=64",
    "model.n_layers=1", "model.seq_len=16", "model.vocab_size=512", "optim.galore_rank=16",
    "optim.galore_min_dim=64", "train.batch_size=2", "train.eval_batches=1", "data.val_fraction=0.1",
]
SNIPPETS = [
    "def add(a, b):\n    return a + b\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n",
    "for name in sorted(items):\n    print(name, len(name))\n",
    "try:\n    run()\nexcept ValueError as exc:\n    raise RuntimeError(str(exc)) from None\n",
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("e3corpus")
    for i in range(80):
        body = "\n".join(SNIPPETS[(i + k) % len(SNIPPETS)] for k in range(3))
        (root / f"mod_{i:03d}.py").write_text(f'"""Module {i}."""\n{body}\nVALUE_{i} = {i * 7}\n', encoding="utf-8")
    return root


def tiny_args(corpus, cache, out):
    args = ["e3", "--quick", "--backend", "numpy", "--steps", "2", "--data", str(corpus), "--cache-dir", str(cache),
            "--out", str(out)]
    for o in TINY:
        args += ["--set", o]
    return args


# ----------------------------------------------------------------------------- presets


def test_e3_presets_share_model_data_and_token_budget():
    cfgs = {name: load_config(name) for name in bench.E3_PRESETS}
    base = cfgs["e3_baseline"]
    b = base.to_dict()
    for name, cfg in cfgs.items():
        a = cfg.to_dict()
        assert {k: v for k, v in a["model"].items() if not k.startswith("mtp")} == \
               {k: v for k, v in b["model"].items() if not k.startswith("mtp")}, name
        assert a["train"] == b["train"], name  # same steps, batch, seed, evaluation
        assert a["data"] == b["data"], name
    assert cfgs["e3_mtp_only"].model.mtp_n_tokens >= 1 and cfgs["e3_full"].model.mtp_n_tokens >= 1
    assert cfgs["e3_muon_8bit"].optim.muon_8bit and cfgs["e3_full"].optim.muon_8bit
    assert cfgs["e3_galore2"].optim.galore and cfgs["e3_full"].optim.galore
    for name in ("e3_galore2", "e3_full"):
        assert cfgs[name].optim.galore_rank == base.model.dim // 4
    for name in ("e3_baseline", "e3_mtp_only", "e3_muon_8bit"):
        assert not cfgs[name].optim.galore
    assert base.model.mtp_n_tokens == 0 and not base.optim.muon_8bit


@pytest.mark.parametrize("scale", [2, 4, 8])
def test_scale_widens_model_and_batch_at_fixed_head_size(scale):
    plan = bench.Plan.make(scale=scale)
    base = load_config("e3_galore2")
    cfg = bench.load_plan_config(plan, "e3_galore2")
    assert cfg.model.dim == scale * base.model.dim
    assert cfg.model.head_dim == base.model.head_dim
    assert cfg.model.ffn_hidden == scale * base.model.ffn_hidden
    assert cfg.optim.galore_rank == cfg.model.dim // 4
    assert cfg.optim.galore_min_dim == scale * base.optim.galore_min_dim
    for name in bench.E3_PRESETS:  # every preset stays valid at this scale
        assert bench.load_plan_config(plan, name).model.dim == cfg.model.dim
    assert cfg.train.batch_size == scale * base.train.batch_size
    assert cfg.train.steps == base.train.steps


def test_quick_plan_overrides():
    plan = bench.Plan.make(quick=True, backend="numpy", overrides=["model.n_layers=1"])
    cfg = bench.load_plan_config(plan, "e3_full")
    assert cfg.train.steps == 4 and cfg.train.eval_every == 2 and cfg.train.eval_batches == 2
    assert cfg.train.backend == "numpy" and cfg.model.n_layers == 1  # user overrides come last
    assert plan.warmup_steps == 1 and plan.collider_reps == 2


def test_bad_plans_are_rejected():
    with pytest.raises(bench.BenchError, match="--scale"):
        bench.Plan.make(scale=0)
    with pytest.raises(bench.BenchError, match="unknown parts"):
        bench.Plan.make(only=["e3_baseline", "colider"])


# --------------------------------------------------------------------------- helpers


def test_tokens_to_reach_interpolates_the_first_crossing():
    curve = [(0, 8.0), (100, 6.0), (200, 5.0), (300, 4.0)]
    assert bench.tokens_to_reach(curve, 5.5) == pytest.approx(150.0)
    assert bench.tokens_to_reach(curve, 4.0) == pytest.approx(300.0)
    assert bench.tokens_to_reach(curve, 9.0) == 0.0
    assert bench.tokens_to_reach(curve, 3.9) is None
    # Not monotone: the first time the curve gets there counts.
    assert bench.tokens_to_reach([(0, 8.0), (100, 4.0), (200, 5.0), (300, 4.5)], 4.5) == pytest.approx(87.5)


def test_timing_summary_leaves_out_warmup_steps():
    rows = [[10.0, 10.0, 10.0, 10.0, 40.0]] + [[1.0, 2.0, 0.5, 0.01, 3.51]] * 4
    t = bench.timing_summary(rows, warmup=1)
    assert t["steps_timed"] == 4 and t["total"] == pytest.approx(3.51) and t["backward"] == pytest.approx(2.0)
    assert bench.timing_summary(rows[:1], warmup=3)["total"] == 40.0  # too few steps: keep them all


def test_float32_muon_reference_is_measured_from_arrays():
    be = backends.get_backend("numpy")
    params = [Tensor(np.zeros((64, 32), np.float32)), Tensor(np.zeros((16, 16), np.float32))]
    # one float32 momentum buffer per matrix plus an int64 step counter each
    assert bench.float32_muon_state_bytes(params, be) == 4 * (64 * 32 + 16 * 16) + 2 * 8


def test_backward_profile_times_ops_and_restores_them():
    cfg = load_config("tiny", ["model.dim=64", "model.n_heads=2", "model.n_kv_heads=2", "model.ffn_hidden=128",
                               "model.group_size=64", "model.n_layers=1", "model.vocab_size=300"]).model
    model = Model(cfg, backends.get_backend("numpy"), seed=0)
    tokens = np.random.default_rng(0).integers(0, 300, (2, 17))
    compute_loss(model, tokens).loss.backward()
    plain = {n: p.grad.copy() for n, p in model.params.items()}
    bench._clear_grads(model)
    res = compute_loss(model, tokens, collider_sparsity=0.4)
    classes = bench._graph_functions(res.loss)
    before = {c: c.__dict__.get("backward") for c in classes}
    with bench.BackwardProfile(res.loss, lambda: None) as prof:
        res.loss.backward()
    assert {c: c.__dict__.get("backward") for c in classes} == before
    assert "TernaryLinear" in prof.seconds and "CrossEntropy" in prof.seconds
    assert all(v >= 0 for v in prof.seconds.values())
    bench._clear_grads(model)
    compute_loss(model, tokens).loss.backward()  # the wrappers left nothing behind
    for n, p in model.params.items():
        np.testing.assert_array_equal(p.grad, plain[n])


# ----------------------------------------------------------------------------- claims


def fake_results(mtp_curve_loss=3.9, sparse_bwd=0.6, muon8=0.25, galore=0.45, full=0.2, wait=0.001, loss8=4.09):
    def cfg(final, hidden, curve=None, total=100):
        curve = curve or [[0, 0, 8.0], [10, 1000, 5.0], [20, 2000, final]]
        return {"final_val_loss": curve[-1][2], "val_curve": curve, "tokens": 2000,
                "optimizer_state_bytes": {"hidden": hidden, "hidden_float32_muon": 100, "total": total + hidden}}

    return {
        "configs": {
            "e3_baseline": cfg(4.0, 100),
            "e3_mtp_only": cfg(None, 100, [[0, 0, 8.0], [10, 1000, 4.5], [20, 2000, mtp_curve_loss]]),
            "e3_muon_8bit": cfg(None, int(100 * muon8), [[0, 0, 8.0], [10, 1000, 5.0], [20, 2000, loss8]]),
            "e3_galore2": cfg(None, int(100 * galore), [[0, 0, 8.0], [10, 1000, 5.0], [20, 2000, 4.0]]),
            "e3_full": cfg(None, int(100 * full), [[0, 0, 8.0], [10, 1000, 5.0], [20, 2000, 4.2]]),
        },
        "collider": {"backward_ratio": sparse_bwd},
        "loader": {"async": {"data_wait_fraction": wait}, "sync": {"data_wait_fraction": wait / 2}},
    }


def claims_by_name(results):
    return {c["claim"].split(":")[0]: c for c in bench.analyse(results)["claims"]}


def test_claim_verdicts_follow_the_targets():
    rows = claims_by_name(fake_results())
    assert len(bench.analyse(fake_results())["claims"]) == 9
    # MTP reaches 4.0 between 1000 (4.5) and 2000 (3.9) tokens: 1000 + 0.5/0.6 * 1000 = 1833.3 of 2000
    assert rows["MTP"]["passed"] and "0.917x" in rows["MTP"]["measured"]
    assert rows["MTP"]["verdict"] == "PASS; claim not reproduced"  # 8.3% fewer tokens < 15%
    assert rows["Collider"]["passed"] and "claim reproduced" in rows["Collider"]["verdict"]
    assert rows["8-bit Muon"]["passed"] and "0.250x" in rows["8-bit Muon"]["measured"]
    assert rows["GaLore 2"]["passed"] and "claim reproduced" in rows["GaLore 2"]["verdict"]  # 55% reduction
    assert rows["combined"]["passed"] is False and rows["combined"]["verdict"].startswith("FAIL")
    assert rows["e3_muon_8bit"]["passed"] is False and "+2.25%" in rows["e3_muon_8bit"]["measured"]
    assert rows["e3_galore2"]["passed"] and rows["e3_full"]["passed"] is False  # 4.2 is 5% above
    assert rows["async loader"]["passed"]


def test_claim_boundaries_and_missing_parts():
    r = fake_results(sparse_bwd=0.76, muon8=0.27, wait=0.02, mtp_curve_loss=4.1, loss8=4.079)
    rows = claims_by_name(r)
    assert rows["Collider"]["passed"] is False
    assert rows["8-bit Muon"]["passed"]  # <= 0.27 inclusive
    assert rows["async loader"]["passed"] is False  # strictly below 2%
    assert rows["MTP"]["passed"] is False and "not reached" in rows["MTP"]["measured"]
    assert rows["e3_muon_8bit"]["passed"]  # +1.98%
    del r["collider"], r["configs"]["e3_galore2"]
    r["loader"] = None
    rows = claims_by_name(r)
    assert rows["Collider"]["verdict"] == "n/a" and rows["Collider"]["passed"] is None
    assert rows["GaLore 2"]["verdict"] == "n/a" and rows["async loader"]["verdict"] == "n/a"


# ------------------------------------------------------------------------- end to end


def test_quick_suite_end_to_end(corpus, tmp_path):
    out = tmp_path / "report"
    assert bench.main(tiny_args(corpus, tmp_path / "cache", out) + ["--in-process"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["configs"]) == set(bench.E3_PRESETS)
    assert results["plan"]["quick"] and results["plan"]["backend"] == "numpy"
    for name, r in results["configs"].items():
        assert r["backend"] == "numpy" and r["steps"] == 2 and r["tokens"] == 2 * 2 * 16
        assert len(r["val_curve"]) == 3 and all(np.isfinite(v) for _, _, v in r["val_curve"])
        assert r["val_curve"][-1][2] == r["final_val_loss"]
        assert set(r["timing"]) >= set(bench.TIME_FIELDS) and r["timing"]["total"] > 0
        assert r["timing"]["total"] >= r["timing"]["forward"] + r["timing"]["backward"]
        assert r["tokens_per_sec"] > 0 and r["peak_rss_bytes"] > 0 and r["gpu_pool_bytes"] is None
        st = r["optimizer_state_bytes"]
        assert st["hidden"] == sum(st["hidden_by_array"].values())
        assert st["total"] == sum(st["groups"].values()) > st["hidden"] > 0
    st = {n: r["optimizer_state_bytes"] for n, r in results["configs"].items()}
    assert st["e3_baseline"]["hidden"] == st["e3_baseline"]["hidden_float32_muon"]  # same thing, measured twice
    assert st["e3_muon_8bit"]["hidden_float32_muon"] == st["e3_baseline"]["hidden"]
    assert "qbuf" in st["e3_muon_8bit"]["hidden_by_array"] and "P" in st["e3_galore2"]["hidden_by_array"]
    assert st["e3_muon_8bit"]["hidden"] < 0.3 * st["e3_baseline"]["hidden"]
    assert st["e3_galore2"]["hidden"] < st["e3_baseline"]["hidden"]
    # Same init and batches: the first validation point is identical for every config.
    assert len({r["val_curve"][0][2] for r in results["configs"].values()}) == 1
    col = results["collider"]
    assert col["kept_fraction"] == pytest.approx(10 / 16) and col["backward_ratio"] > 0
    assert "BitLinear (ternary_linear)" in col["profile"]["dense"]
    lo = results["loader"]
    assert 0 <= lo["async"]["data_wait_fraction"] < 1 and 0 <= lo["sync"]["data_wait_fraction"] < 1
    report = (out / "REPORT.md").read_text()
    assert report.count("\n| ") > 9 and "## Claims" in report and "quick mode" in report
    for png in ("e3_val_loss.png", "e3_step_time.png", "e3_collider.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({png})" in report
    # The report is a pure function of results.json: rendering it again gives the same text.
    assert bench.main(["report", str(out)]) == 0
    assert (out / "REPORT.md").read_text() == report


def test_suite_parts_run_in_fresh_processes(corpus, tmp_path):
    out = tmp_path / "sub"
    args = tiny_args(corpus, tmp_path / "cache", out) + ["--only", "e3_baseline,loader"]
    assert bench.main(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert list(results["configs"]) == ["e3_baseline"] and results["collider"] is None
    assert results["loader"]["steps"] == 3
    assert (out / "runs" / "e3_baseline" / "metrics.jsonl").exists()
    rows = {c["claim"].split(":")[0]: c for c in bench.analyse(results)["claims"]}
    assert rows["Collider"]["verdict"] == "n/a" and rows["async loader"]["verdict"] != "n/a"


def test_cli_errors(tmp_path, capsys):
    assert bench.main(["e3", "--quick", "--only", "nothing"]) == 2
    assert "unknown parts" in capsys.readouterr().err
    assert bench.main(["e3", "--quick", "--set", "model.dim=-1"]) == 2
    assert bench.main(["report", str(tmp_path)]) == 2
    assert "no results.json" in capsys.readouterr().err
