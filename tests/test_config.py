"""The run configuration: presets, overrides, strict validation, round trips, parameter counts."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nanochat.config import (
    PARAMETER_COMPONENTS,
    Config,
    ConfigError,
    ModelConfig,
    available_presets,
    config_keys,
    count_parameters,
    load_config,
)

pytestmark = pytest.mark.trainer

PRESETS = ["tiny", "nano_125m", "small_560m", "medium_3b",
           "e3_baseline", "e3_mtp_only", "e3_muon_8bit", "e3_galore2", "e3_full"]
PRESET_DIR = Path(__file__).resolve().parents[1] / "nanochat" / "presets"
DOCS = Path(__file__).resolve().parents[1] / "docs" / "config.md"


def _error(preset_or_path=None, overrides=()):
    with pytest.raises(ConfigError) as info:
        load_config(preset_or_path, overrides)
    assert isinstance(info.value, ValueError)
    message = str(info.value)
    assert "\n" not in message and message.endswith((".", "?")), message
    return message


def _write(tmp_path, text, name="run.toml"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# --- presets ---------------------------------------------------------------------------------


def test_every_required_preset_ships():
    assert set(PRESETS) <= set(available_presets())


@pytest.mark.parametrize("name", PRESETS)
def test_preset_loads_validates_and_has_a_header(name):
    cfg = load_config(name)
    assert isinstance(cfg, Config)
    m = cfg.model
    assert m.dim % m.n_heads == 0 and m.head_dim % 2 == 0 and m.dim % m.group_size == 0
    first = (PRESET_DIR / f"{name}.toml").read_text(encoding="utf-8").splitlines()[0]
    assert first.startswith(f"# {name}:"), first


def test_default_is_tiny_and_tiny_is_small_plain_and_cpu_sized():
    cfg = load_config()
    assert cfg == load_config("tiny")
    m, o = cfg.model, cfg.optim
    assert (m.dim, m.n_layers, m.n_heads, m.n_kv_heads, m.ffn_hidden) == (256, 4, 4, 4, 768)
    assert (m.seq_len, m.vocab_size, m.group_size, m.n_streams) == (256, 4096, 256, 1)
    assert cfg.train.batch_size == 8 and 300 <= cfg.train.steps <= 600
    assert not (o.muon_8bit or o.galore) and o.scalar_optimizer == "adamw"
    assert m.n_experts == 0 and m.deltanet_layer_ids == () and m.mtp_n_tokens == 0


def test_e3_suite_shares_one_model_and_switches_one_feature_each():
    suite = {n: load_config(n) for n in PRESETS if n.startswith("e3_")}
    shape = {n: dataclasses.replace(c.model, mtp_n_tokens=0) for n, c in suite.items()}
    assert len(set(shape.values())) == 1
    assert len({(c.train.steps, c.train.batch_size, c.train.seed) for c in suite.values()}) == 1
    feats = {n: (c.model.mtp_n_tokens > 0, c.optim.muon_8bit, c.optim.galore) for n, c in suite.items()}
    assert feats == {
        "e3_baseline": (False, False, False),
        "e3_mtp_only": (True, False, False),
        "e3_muon_8bit": (False, True, False),
        "e3_galore2": (False, False, True),
        "e3_full": (True, True, True),
    }
    assert suite["e3_galore2"].optim.galore_rank == suite["e3_galore2"].model.dim // 4


def test_big_presets_have_their_features():
    small, medium = load_config("small_560m").model, load_config("medium_3b")
    assert len(small.deltanet_layer_ids) / small.n_layers == pytest.approx(0.2, abs=0.02)
    m = medium.model
    assert (m.n_experts, m.moe_top_k, m.n_streams) == (8, 2, 4) and medium.optim.muon_8bit
    assert m.moe_layer_ids == tuple(range(m.n_layers))


@pytest.mark.parametrize("name,low,high", [
    ("nano_125m", 110e6, 140e6),
    ("small_560m", 500e6, 620e6),
    ("medium_3b", 2.5e9, 3.5e9),
])
def test_preset_parameter_counts_are_in_range(name, low, high):
    assert low <= count_parameters(load_config(name).model)["total"] <= high


# --- parameter counts ------------------------------------------------------------------------


def test_tiny_count_by_hand():
    c = count_parameters(load_config("tiny"))
    emb, attn, ffn = 4096 * 256, 4 * 256 * 256, 3 * 256 * 768
    norms = 4 * (2 * 256 + 256 + 768) + 256  # two pre-norms + SubLN (o input, down input), final
    assert c["embedding"] == emb and c["lm_head"] == 0
    assert c["attn_q"] + c["attn_k"] + c["attn_v"] + c["attn_o"] == 4 * attn
    assert c["ffn"] == 4 * ffn and c["norms"] == norms
    assert c["total"] == emb + 4 * (attn + ffn) + norms


@pytest.mark.parametrize("name", PRESETS)
def test_components_sum_to_total(name):
    c = count_parameters(load_config(name).model)
    assert list(c) == list(PARAMETER_COMPONENTS) + ["total"]
    assert sum(v for k, v in c.items() if k != "total") == c["total"]
    assert all(v >= 0 for v in c.values())


def test_untied_head_and_gqa_counts():
    m = ModelConfig(dim=256, n_heads=8, n_kv_heads=2, tie_embeddings=False)
    c = count_parameters(m)
    assert c["lm_head"] == c["embedding"] == 4096 * 256
    assert c["attn_k"] == c["attn_v"] == 4 * 256 * (2 * 32)


@pytest.mark.parametrize("n,static", [(2, 9), (4, 40)])
def test_mhc_counts(n, static):
    base = ModelConfig(n_streams=n, mhc_mode="static")
    assert count_parameters(base)["mhc"] == 2 * 4 * static
    logits = {2: 5, 4: 32}[n]
    dynamic = dataclasses.replace(base, mhc_mode="dynamic")
    assert count_parameters(dynamic)["mhc"] == 2 * 4 * (static + logits * n * 256 + 1)


def test_moe_deltanet_and_mtp_counts():
    m = ModelConfig(n_experts=4, moe_top_k=2, moe_hidden=512, moe_shared_expert=True, moe_layers="every_other",
                    deltanet_layers=(0,), deltanet_heads=2, deltanet_key_dim=64, deltanet_value_dim=128,
                    mtp_n_tokens=3)
    c = count_parameters(m)
    assert m.moe_layer_ids == (1, 3)
    assert c["moe_experts"] == 2 * 4 * 3 * 256 * 512
    assert c["moe_router"] == 2 * 256 * 4
    assert c["moe_shared_expert"] == 2 * 3 * 256 * 512
    assert c["ffn"] == 2 * 3 * 256 * 768
    assert c["deltanet_qkv"] == 256 * 2 * (64 + 64 + 128)
    assert c["deltanet_gate"] == c["deltanet_out"] == 256 * 256
    assert c["deltanet_decay"] == 2 * 256 * 2 + 2 * 2
    assert c["attn_q"] == 3 * 256 * 256
    assert c["mtp"] == 3 * (256 * 256 + 256)


@pytest.mark.parametrize("n_layers,ratio,expected", [
    (24, 0.2, (3, 7, 12, 16, 20)),
    (4, 0.25, (2,)),
    (4, 0.5, (1, 2)),
    (4, 0.75, (1, 2, 3)),   # one attention block left: block 0
    (2, 0.5, (1,)),
    (3, 0.34, (1,)),
    (4, 1.0, (0, 1, 2, 3)),
])
def test_deltanet_ratio_places_layers_evenly(n_layers, ratio, expected):
    m = ModelConfig(n_layers=n_layers, deltanet_ratio=ratio)
    assert m.deltanet_layer_ids == expected
    kinds = [mixer for mixer, _ in m.block_kinds()]
    assert [i for i, k in enumerate(kinds) if k == "deltanet"] == list(expected)


def test_deltanet_ratio_keeps_the_first_and_last_blocks_attention():
    """docs/config.md: the first and last blocks stay attention while at least two attention
    blocks remain; the chosen blocks are n = round(ratio * L), unique, and spread over the interior."""
    for n_layers in range(1, 41):
        for n in range(0, n_layers + 1):
            ratio = n / n_layers
            ids = ModelConfig(n_layers=n_layers, deltanet_ratio=ratio).deltanet_layer_ids
            assert len(ids) == len(set(ids)) == n and list(ids) == sorted(ids)
            assert all(0 <= i < n_layers for i in ids)
            if n <= n_layers - 2:
                assert 0 not in ids and n_layers - 1 not in ids
                steps = [b - a for a, b in zip(ids, ids[1:])]  # evenly spread: the spacing varies by at most 1
                assert not steps or max(steps) - min(steps) <= 1
            elif n < n_layers:
                assert ids == tuple(range(1, n_layers))
            else:
                assert ids == tuple(range(n_layers))


# --- unknown names ---------------------------------------------------------------------------


def test_unknown_key_in_file_suggests_the_close_one(tmp_path):
    path = _write(tmp_path, 'base = "tiny"\n[model]\ndimm = 512\n')
    message = _error(path)
    assert str(path) in message and "'model.dimm'" in message and "did you mean 'model.dim'?" in message


def test_unknown_key_in_override_suggests_the_close_one():
    message = _error("tiny", ["model.dimm=512"])
    assert message.startswith("--set model.dimm=512:") and "'model.dim'" in message
    assert "'train.steps'" in _error("tiny", ["stepz=3"])


def test_key_in_the_wrong_section_points_to_the_right_one(tmp_path):
    message = _error(_write(tmp_path, "[model]\nsteps = 3\n"))
    assert "'model.steps'" in message and "'train.steps'" in message


def test_unknown_section_and_top_level_key(tmp_path):
    message = _error(_write(tmp_path, "[modle]\ndim = 3\n"))
    assert "unknown section [modle]; did you mean [model]?" in message
    message = _error(_write(tmp_path, "dim = 512\n"))
    assert "top-level key 'dim'" in message and "'model.dim'" in message
    assert "unknown section 'modle'" in _error("tiny", ["modle.dim=4"])


def test_unknown_preset_suggests_names():
    message = _error("tinny")
    assert "preset 'tinny'" in message and "'tiny'" in message


# --- types and ranges ------------------------------------------------------------------------


@pytest.mark.parametrize("override,fragment", [
    ('model.dim="256"', "model.dim must be an integer, got the string \"256\""),
    ("model.dim=2.5", "model.dim must be an integer, got the float 2.5"),
    ("model.n_layers=true", "model.n_layers must be an integer, got the boolean true"),
    ("model.sub_norm=1", "model.sub_norm must be true or false, got the integer 1"),
    ("optim.muon_lr=fast", "optim.muon_lr must be a number, got the string \"fast\""),
    ("optim.muon_lr=nan", "optim.muon_lr must be finite"),
    ("optim.adamw_betas=[0.9, 0.95, 0.99]", "optim.adamw_betas must be a list of two numbers"),
    ("model.deltanet_layers=[1.5]", "model.deltanet_layers must be a list of integers"),
    ("model.moe_layers=sometimes", "model.moe_layers = \"sometimes\" is not allowed"),
    ("model.ffn_type=gelu", "model.ffn_type = \"gelu\" is not allowed; choose one of \"swiglu\", \"relu2\""),
    ("model.n_streams=3", "model.n_streams = 3 is not allowed; choose one of 1, 2, 4"),
    ("model.group_size=32", "model.group_size = 32 is not allowed"),
    ("model.dim=0", "model.dim = 0 is out of range; it must be at least 1"),
    ("train.collider_sparsity=1.0", "train.collider_sparsity = 1.0 is out of range; it must be less than 1"),
    ("optim.adamw_betas=[0.9, 1.5]", "optim.adamw_betas = 1.5 is out of range"),
    ("model.mhc_mode=sometimes", "model.mhc_mode = \"sometimes\" is not allowed"),
])
def test_bad_types_and_ranges_name_the_field_and_value(override, fragment):
    message = _error("tiny", [override])
    assert message.startswith(f"--set {override}:") and fragment in message, message


def test_bad_type_in_file_names_the_file(tmp_path):
    path = _write(tmp_path, '[model]\nseq_len = "long"\n')
    message = _error(path)
    assert message.startswith(f"config file '{path}':") and "model.seq_len must be an integer" in message


# --- inconsistent values ---------------------------------------------------------------------


@pytest.mark.parametrize("overrides,fragments", [
    (["model.dim=768", "model.n_heads=5"], ["model.dim = 768", "model.n_heads = 5", "not divisible"]),
    (["model.n_heads=4", "model.n_kv_heads=3"], ["model.n_heads = 4", "model.n_kv_heads = 3"]),
    (["model.dim=768", "model.n_heads=256"], ["head_dim", "768 / 256 = 3", "RoPE"]),
    (["model.dim=320", "model.n_heads=4", "model.group_size=128"], ["model.dim = 320", "model.group_size = 128"]),
    (["model.ffn_hidden=700"], ["model.ffn_hidden = 700", "model.group_size = 256"]),
    (["model.n_experts=2", "model.moe_top_k=3"], ["model.moe_top_k = 3", "model.n_experts = 2"]),
    (["model.n_experts=4", "model.moe_hidden=300"], ["expert hidden size 300", "model.group_size = 256"]),
    (["model.n_experts=4", "model.moe_layers=[0, 9]"], ["model.moe_layers = [0, 9]", "block index 9", "0..3"]),
    (["model.n_experts=4", "model.moe_layers=[]"], ["model.moe_layers = []", "selects no block"]),
    (["model.n_experts=4", "model.n_layers=1", "model.moe_layers=every_other"], ["\"every_other\"", "selects no block"]),
    (["model.deltanet_layers=[4]"], ["model.deltanet_layers = [4]", "block index 4", "model.n_layers = 4"]),
    (["model.deltanet_layers=[1, 1]"], ["model.deltanet_layers = [1, 1]", "block 1 more than once"]),
    (["model.deltanet_layers=[1]", "model.deltanet_ratio=0.5"], ["model.deltanet_layers = [1]",
                                                                  "model.deltanet_ratio = 0.5", "only one"]),
    (["model.deltanet_ratio=0.1"], ["model.deltanet_ratio = 0.1", "= 0 of the model.n_layers = 4"]),
    (["model.deltanet_ratio=0.25", "model.deltanet_heads=3"], ["3 * 64 = 192", "model.group_size = 256"]),
    (["optim.galore=true", "optim.galore_rank=300"], ["optim.galore_rank = 300", "optim.galore_min_dim = 256"]),
    (["train.collider_sparsity=0.001"], ["train.collider_sparsity = 0.001", "model.seq_len = 256"]),
])
def test_inconsistent_values_are_named_with_their_values(overrides, fragments):
    message = _error("tiny", overrides)
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    assert "--set" in message


def test_inconsistency_names_every_source_involved():
    message = _error("tiny", ["model.n_heads=5"])
    assert message.startswith("preset 'tiny' and --set model.n_heads=5:"), message
    assert "model.dim = 256" in message and "model.n_heads = 5" in message


# --- overrides -------------------------------------------------------------------------------


def test_overrides_parse_as_toml_values_or_plain_strings():
    cfg = load_config("tiny", [
        "dim=512",                       # bare key, unique to [model]
        "model.n_streams=2",
        "mhc_mode=static",               # bare string
        'optim.decay="linear"',          # quoted string
        "optim.adamw_betas=[0.8, 0.9]",
        "model.deltanet_layers=[1, 3]",
        "train.async_loader=false",
        "optim.muon_lr=3e-3",
        "optim.embedding_lr=1",          # an integer where a float is expected
        "data.path=/tmp/some corpus.txt",
        "train.sample_prompt=",
    ])
    assert cfg.model.dim == 512 and cfg.model.n_streams == 2 and cfg.model.mhc_mode == "static"
    assert cfg.optim.decay == "linear" and cfg.optim.adamw_betas == (0.8, 0.9)
    assert cfg.model.deltanet_layer_ids == (1, 3) and cfg.train.async_loader is False
    assert cfg.optim.muon_lr == 3e-3 and isinstance(cfg.optim.embedding_lr, float)
    assert cfg.data.path == "/tmp/some corpus.txt" and cfg.train.sample_prompt == ""


def test_later_overrides_win_and_malformed_ones_are_rejected():
    assert load_config("tiny", ["steps=5", "train.steps=7"]).train.steps == 7
    assert "section.key=value" in _error("tiny", ["steps"])
    assert "section.key=value" in _error("tiny", ["=5"])


def test_with_overrides_revalidates():
    cfg = load_config("tiny")
    assert cfg.with_overrides(["train.steps=3"]).train.steps == 3
    with pytest.raises(ConfigError, match="model.n_heads = 3"):
        cfg.with_overrides(["model.n_heads=3"])


def test_config_is_frozen():
    cfg = load_config("tiny")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.model.dim = 3


# --- round trips and files -------------------------------------------------------------------


@pytest.mark.parametrize("name", PRESETS)
def test_dict_and_toml_round_trip(name, tmp_path):
    cfg = load_config(name)
    assert Config.from_dict(cfg.to_dict()) == cfg
    path = _write(tmp_path, cfg.to_toml(header=f"resolved {name}\nsecond line"), "resolved.toml")
    assert load_config(path) == cfg
    assert load_config(str(path)) == cfg


@given(
    heads=st.sampled_from([(4, 1), (4, 2), (4, 4), (8, 2), (2, 2)]),
    width=st.sampled_from([256, 512, 768]),
    n_layers=st.integers(1, 6),
    n_streams=st.sampled_from([1, 2, 4]),
    mode=st.sampled_from(["static", "dynamic"]),
    experts=st.sampled_from([0, 2, 4]),
    mtp=st.integers(0, 3),
    prompt=st.text(max_size=12),
    lr=st.floats(0, 1, allow_nan=False),
)
def test_valid_configs_round_trip_and_count_consistently(heads, width, n_layers, n_streams, mode, experts, mtp,
                                                          prompt, lr):
    model = {"dim": width, "n_heads": heads[0], "n_kv_heads": heads[1], "n_layers": n_layers,
             "n_streams": n_streams, "mhc_mode": mode, "n_experts": experts, "moe_top_k": 1, "mtp_n_tokens": mtp}
    cfg = Config.from_dict({"model": model, "optim": {"muon_lr": lr}, "train": {"sample_prompt": prompt}})
    assert Config.from_dict(cfg.to_dict()) == cfg
    assert Config.from_dict(_toml_loads(cfg.to_toml())) == cfg
    counts = count_parameters(cfg)
    assert counts["total"] == sum(v for k, v in counts.items() if k != "total")
    assert (counts["mhc"] > 0) == (n_streams > 1) and (counts["moe_router"] > 0) == (experts > 0)


def _toml_loads(text):
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    return tomllib.loads(text)


def test_to_toml_escapes_strings(tmp_path):
    cfg = load_config("tiny", ['train.sample_prompt="a \\"quote\\"\\n\\ttab \\\\ \\u007f é"'])
    assert cfg.train.sample_prompt == 'a "quote"\n\ttab \\ \x7f é'
    assert load_config(_write(tmp_path, cfg.to_toml())) == cfg


def test_from_dict_fills_defaults_and_rejects_unknown_keys():
    cfg = Config.from_dict({"model": {"dim": 512}})
    assert cfg.model.dim == 512 and cfg.train == Config().train
    with pytest.raises(ConfigError, match=r"^checkpoint x: unknown key 'train.stepz'; did you mean 'train.steps'\?$"):
        Config.from_dict({"train": {"stepz": 1}}, source="checkpoint x")
    with pytest.raises(ConfigError, match="must be a table"):
        Config.from_dict({"train": 3})


def test_file_inherits_from_preset_and_relative_file(tmp_path):
    _write(tmp_path, 'base = "e3_baseline"\n[train]\nsteps = 11\n', "parent.toml")
    child = _write(tmp_path, 'base = "parent.toml"\n[model]\ndim = 512\n', "child.toml")
    cfg = load_config(child, ["train.seed=3"])
    assert cfg.model.dim == 512 and cfg.train.steps == 11 and cfg.train.seed == 3
    assert cfg.model.seq_len == load_config("e3_baseline").model.seq_len


def test_base_cycle_and_bad_base(tmp_path):
    _write(tmp_path, 'base = "b.toml"\n', "a.toml")
    _write(tmp_path, 'base = "a.toml"\n', "b.toml")
    assert "loops back" in _error(tmp_path / "a.toml")
    assert "base must be a preset name" in _error(_write(tmp_path, "base = 3\n"))
    assert "preset 'nope'" in _error(_write(tmp_path, 'base = "nope"\n'))


def test_bad_toml_syntax_is_one_error_naming_the_file(tmp_path):
    path = _write(tmp_path, "[model]\ndim = = 3\n")
    message = _error(path)
    assert message.startswith(f"config file '{path}': invalid TOML syntax:") and "line 2" in message


def test_missing_and_non_utf8_files(tmp_path):
    assert "does not exist" in _error(tmp_path / "missing.toml")
    (tmp_path / "folder.toml").mkdir()
    assert "not a regular file" in _error(tmp_path / "folder.toml")
    path = tmp_path / "binary.toml"
    path.write_bytes(b"[model]\ndim = 3 # \xff\n")
    assert "not UTF-8" in _error(path)


def test_section_must_be_a_table(tmp_path):
    assert "[model] must be a table" in _error(_write(tmp_path, 'model = "big"\n'))
    message = _error(_write(tmp_path, "[model.moe]\nn_experts = 1\n"))
    assert "unknown key 'model.moe'; sections are flat" in message and "'model.moe_top_k'" in message


# --- documentation ---------------------------------------------------------------------------


def test_every_key_is_documented_with_its_default():
    rows = {}
    for line in DOCS.read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 3 and cells[0].startswith("`") and cells[0].endswith("`"):
            rows[cells[0].strip("`")] = cells[1].strip("`")
    from nanochat.config import _toml_value

    for section, key, default, _ in config_keys():
        assert f"{section}.{key}" in rows, f"{section}.{key} missing from docs/config.md"
        assert rows[f"{section}.{key}"] == _toml_value(default), (section, key)


@pytest.mark.parametrize("overrides", [
    [],
    ["model.n_streams=2", "model.mhc_mode=static", "model.sub_norm=false", "model.n_kv_heads=2"],
    ["model.n_streams=4", "model.n_experts=4", "model.moe_shared_expert=true", "model.moe_layers=every_other",
     "model.deltanet_layers=[1]", "model.deltanet_key_dim=32", "model.tie_embeddings=false", "model.mtp_n_tokens=2"],
])
def test_counts_match_the_model_parameters(overrides):
    """The shape-only count agrees with the arrays the model actually allocates (small configs)."""
    import backends
    from nanochat.model import gpt as model_module

    cfg = load_config("tiny", overrides)
    model = model_module.Model(cfg.model, backends.get_backend("numpy"), seed=0)
    params = model.params.values() if isinstance(model.params, dict) else model.params
    assert sum(int(p.size) for p in params) == count_parameters(cfg.model)["total"]
