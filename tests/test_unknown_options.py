"""A ``method_options`` key that a method does not take is refused, naming the field, never silently ignored
(a misspelt ``blokc_v`` would run the default and look like a measurement of the option).

Declared options (``register_method(..., options=...)``) are checked when the config is planned and again
before the builder runs; for every method, a key the builder never read is refused after it returns.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from attnbench import masks
from attnbench.config.plan import ConfigError, build_plan, check_method_options
from attnbench.config.plugins import load_plugins
from attnbench.execute.runner import run_sweep
from attnbench.methods import METHODS, BuildContext, MaskInfo, UnknownOption, as_prepared
from attnbench.methods.case import Case

REPO = Path(__file__).resolve().parent.parent
PLUGIN = str(Path(__file__).resolve().parent / "plugins" / "option_methods.py")


@pytest.fixture(scope="module", autouse=True)
def _plugin():
    load_plugins([PLUGIN])


def _ctx(method, params, mask="causal", seq=32, heads=2, dim=16):
    spec = masks.make_mask(mask)
    case = Case(method=method, mask=spec.label, mask_name=spec.name, batch=1, heads_q=heads, heads_kv=heads,
                seq_q=seq, seq_kv=seq, head_dim=dim, dtype="float32", mode="fwd", seed=0)
    bound = spec.bind(seq, seq)
    return BuildContext(case=case, mask=MaskInfo.of(bound), bound=bound, device=torch.device("cpu"),
                        dtype=torch.float32, options={"method_options": {method: dict(params)}}, params=dict(params))


def _build(method, params, **kw):
    return as_prepared(METHODS[method].build(_ctx(method, params, **kw)))


def _runs(method, params, **kw) -> torch.Tensor:
    """Build and call the fast path once on small random inputs (the options were taken)."""
    prepared = _build(method, params, **kw)
    ctx = _ctx(method, params, **kw)
    case = ctx.case
    gen = torch.Generator().manual_seed(1)
    if METHODS[method].caps.form == "layer":
        out = prepared.fn(torch.randn(case.batch, case.seq_q, case.heads_q * case.head_dim, generator=gen))
    else:
        q, k, v = (torch.randn(case.batch, case.heads_q, case.seq_q, case.head_dim, generator=gen) for _ in range(3))
        extras = {name: extra.make(gen, "cpu", torch.float32) for name, extra in prepared.extras.items()}
        if prepared.prepare:
            extras.update(prepared.prepare(q, k, v, **extras))
        out = prepared.fn(q, k, v, **extras)
    assert torch.isfinite(out).all()
    return out


# one representative per family: (method, a misspelt key, the option it misspells with a valid value, mask)
FAMILIES = [
    ("delta_rule", "blokc_v", ("chunk", 16), "causal"),  # linear
    ("sdpa_math", "scale", None, "causal"),  # exact: takes no options at all
    ("lamamba", "windw", ("window", 8), "causal"),  # hybrid (layer form)
    ("taylor_softmax", "ordr", ("order", 2), "causal"),  # analysis
    ("halo", "blok", ("block", 8), "full"),  # sparse (its Options reader)
]


@pytest.mark.parametrize("method, bad, good, mask", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_a_misspelt_key_is_refused_naming_the_field_in_every_family(method, bad, good, mask):
    with pytest.raises(UnknownOption) as info:
        _build(method, {bad: 16}, mask=mask)
    message = str(info.value)
    assert message.startswith(f"method_options.{method}.{bad}: not an option of {method} ("), message
    if good is None:
        assert "it takes no options" in message
    else:
        listed = re.search(r"its options: ([^)]*)\)", message).group(1).split(", ")
        assert good[0] in listed and bad not in listed
        # negative control: the key spelled right builds and runs, and it is the option (another value differs)
        _runs(method, {good[0]: good[1]}, mask=mask)
    # the same key at plan time: refused before any case, the field in ConfigError
    with pytest.raises(ConfigError, match=rf"method_options\.{method}\.{bad}'"):
        check_method_options({"method_options": {method: {bad: 16}}})


def test_several_misspelt_keys_are_named_together():
    with pytest.raises(UnknownOption, match=r"method_options\.delta_rule\.blokc_v, method_options\.delta_rule\.chnk: "
                                            r"not options of delta_rule"):
        _build("delta_rule", {"chnk": 16, "blokc_v": 16})


def test_a_correct_key_is_taken():
    """Negative control of the refusal: spelled right, the option changes what runs."""
    plain = _runs("uo_plugin", {})
    assert torch.allclose(_runs("uo_plugin", {"scale": 1.0}), plain)
    assert not torch.allclose(_runs("uo_plugin", {"scale": 3.0}), plain)


def test_an_undeclared_method_is_checked_against_what_its_builder_reads():
    # ctx.param reads ``scale`` and ``mode``; a misspelt key is refused after the build, with what it read
    with pytest.raises(UnknownOption, match=r"^method_options\.uo_plugin\.scael: not an option of uo_plugin "
                                            r"\(its options: mode, scale\)$"):
        _build("uo_plugin", {"scael": 2.0})
    check_method_options({"method_options": {"uo_plugin": {"scael": 2.0}}})  # undeclared: not known at plan time


def test_a_conditional_option_is_taken_where_its_path_reads_it():
    # ``temperature`` is read (through ctx.params[...], direct access counts) only when mode is tempered
    tempered = _runs("uo_plugin", {"mode": "tempered", "temperature": 4.0})
    assert torch.allclose(tempered, _runs("uo_plugin", {"scale": 0.25}))
    with pytest.raises(UnknownOption, match=r"method_options\.uo_plugin\.temperature: not an option"):
        _build("uo_plugin", {"temperature": 4.0})  # mode plain: nothing reads it, so it would do nothing
    # declared: accepted at plan time, refused at build where this case's path does not use it
    check_method_options({"method_options": {"uo_declared": {"temperature": 4.0}}})
    assert torch.allclose(_runs("uo_declared", {"mode": "tempered", "temperature": 4.0}), tempered)
    with pytest.raises(UnknownOption, match=r"method_options\.uo_declared\.temperature: not used by uo_declared "
                                            r"for this case \(the options it read: mode, scale\)"):
        _build("uo_declared", {"temperature": 4.0})


def test_a_conditional_option_of_a_built_in_method():
    # delta_rule's Triton-only options: refused by the method itself under impl torch, naming the field
    with pytest.raises(ValueError, match=r"method_options\.delta_rule\.block_v: applies to impl 'triton' only"):
        _build("delta_rule", {"block_v": 16})
    # linear_attn: compute_dtype is the chunked form's option, taken there
    _runs("linear_attn", {"impl": "chunked", "compute_dtype": "float32", "chunk": 8})


def test_declared_options_are_refused_before_the_builder_runs():
    builds = sys.modules["attnbench_plugin_option_methods"].BUILDS
    before = builds["uo_declared"]
    with pytest.raises(UnknownOption, match=r"method_options\.uo_declared\.scael: not an option of uo_declared "
                                            r"\(its options: mode, scale, temperature\)"):
        _build("uo_declared", {"scael": 2.0})
    assert builds["uo_declared"] == before  # refused before any work
    _build("uo_declared", {"scale": 2.0})
    assert builds["uo_declared"] == before + 1


def test_a_registration_that_under_declares_its_options_is_an_error():
    with pytest.raises(RuntimeError, match=r"'uo_liar' reads method_options field\(s\) hidden that its "
                                           r"registration does not declare"):
        _build("uo_liar", {})


def test_a_method_that_reads_every_key_it_is_given_passes_unchanged():
    """Negative control of the after-build check: a builder that reads what it is given is not refused,
    whatever the order of the keys or the values."""
    _build("uo_plugin", {"mode": "tempered", "scale": 2.0, "temperature": 0.5})


# ---- through the harness ----------------------------------------------------------------------------------------
def _rows(cfg) -> pd.DataFrame:
    return pd.read_parquet(run_sweep(cfg, "test", show_progress=False) / "rows.parquet")


def test_a_sweep_gives_an_error_row_naming_the_field_and_goes_on(cfg):
    cfg.update(plugins=[PLUGIN], methods=["sdpa_math", "uo_plugin"], masks=["causal"],
               method_options={"uo_plugin": {"scael": 2.0}})
    frame = _rows(cfg)
    bad = frame[frame.method == "uo_plugin"].iloc[0]
    assert bad.status == "error", bad.reason
    assert "method_options.uo_plugin.scael: not an option of uo_plugin (its options: mode, scale)" in bad.reason
    assert pd.isna(bad.ms_median)
    assert frame[frame.method == "sdpa_math"].iloc[0].status == "ok"  # the run went on


def test_a_sweep_with_the_key_spelled_right_measures(cfg):
    """Negative control of the error row."""
    cfg.update(plugins=[PLUGIN], methods=["uo_plugin"], masks=["causal"], method_options={"uo_plugin": {"scale": 1.0}})
    row = _rows(cfg).iloc[0]
    assert row.status == "ok", row.reason


def test_a_sweep_with_a_misspelt_declared_key_fails_at_plan_time_before_any_work(cfg, tmp_path):
    cfg.update(methods=["sdpa_math", "delta_rule"], masks=["causal"],
               method_options={"delta_rule": {"blokc_v": 16}})
    with pytest.raises(ConfigError, match=r"'method_options\.delta_rule\.blokc_v': not an option of delta_rule "
                                          r"\(its options: block_v, chunk,"):
        build_plan(cfg)
    with pytest.raises(ConfigError, match="blokc_v"):
        run_sweep(cfg, "test", show_progress=False)
    assert not (Path(cfg["results_dir"]) / "test" / "rows.parquet").exists()


def test_the_train_planner_refuses_a_misspelt_key():
    from attnbench.execute.train import build_train_plan

    cfg = {"tasks": ["sort"], "methods": ["delta_rule"], "seeds": [0], "device": "cpu",
           "method_options": {"delta_rule": {"chnk": 16}}, "task_options": {"sort": {"seq_lens": [16]}}}
    with pytest.raises(ConfigError, match=r"method_options\.delta_rule\.chnk"):
        build_train_plan(cfg)


# ---- the committed configs, scripts and fits pass only options the methods take --------------------------------
def _composed(config_name: str, group: str) -> list[tuple[str, dict]]:
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    found = []
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        for preset in sorted(p.stem for p in (REPO / "conf" / group).glob("*.yaml")):
            cfg = OmegaConf.to_container(compose(config_name=config_name, overrides=[f"{group}={preset}"]),
                                         resolve=True)
            found.append((f"{group}/{preset}", cfg.get("method_options") or {}))
    return found


def test_every_committed_preset_and_suite_passes_only_declared_options():
    load_plugins([])
    composed = _composed("config", "sweep") + _composed("train", "suite")
    assert len(composed) >= 10 and any(options for _, options in composed)  # the presets were read
    for where, options in composed:
        for method, given in options.items():
            assert method in METHODS, (where, method)
            assert METHODS[method].options is not None, (where, method)
            assert not METHODS[method].unknown_options(given), (where, method, given, sorted(METHODS[method].options))
    # negative control: the same check catches a misspelt key
    assert METHODS["linear_attn"].unknown_options({"chunck": 128}) == ["chunck"]


def test_every_method_option_override_in_the_scripts_is_declared():
    pattern = re.compile(r"\+?method_options\.([A-Za-z0-9_]+)\.([A-Za-z0-9_]+)=")
    seen = []
    for script in sorted((REPO / "scripts").glob("*")):
        if script.suffix not in (".sh", ".py") or not script.is_file():
            continue
        for method, key in pattern.findall(script.read_text()):
            seen.append((script.name, method, key))
            assert method in METHODS and METHODS[method].options is not None, (script.name, method)
            assert key in METHODS[method].options, (script.name, method, key, sorted(METHODS[method].options))
    assert len(seen) >= 5  # the scripts' overrides were found


def test_options_fitted_to_a_length_are_declared_options():
    from attnbench.methods.fitting import LENGTH_FITS, fitted_options

    assert LENGTH_FITS
    for method in LENGTH_FITS:
        for seq, causal in ((16, True), (64, False), (128, True)):
            fitted = fitted_options(method, seq, seq, causal, {})
            assert not METHODS[method].unknown_options(fitted), (method, seq, fitted)


def test_every_built_in_method_declares_its_options():
    """A built-in method's misspelt key fails at plan time: every registration in methods/ declares its options."""
    undeclared = [name for name, spec in METHODS.items()
                  if spec.options is None and spec.module.startswith("attnbench.methods")]
    assert not undeclared
