"""Presets and stage settings: recorded plans reproduced exactly, settings applied and refused."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from spindle_local.policy import Geometry, PlanContext, full_cache_bytes, make_policy
from spindle_local.policy.presets import PRESETS, apply_settings, preset, setting_keys
from spindle_local.policy.stages import Codebooks, MassShares, PyramidShares
from spindle_local.policy.synthetic import make_layers

GEO = Geometry(n_layer=6, n_head=6, n_head_kv=2, head_dim_k=16, head_dim_v=16)
RECORDED = Path(__file__).parent / "data" / "recorded_plans.json"

# The configurations recorded (with the policies as they were before they became stage
# compositions), written as presets plus settings. The spindle rows were recorded when the
# preset had codebook layers (now off by default), a 256-slot minimum under mass allocation,
# no token floor for salient runs and no evicted-mass counts, so they set those back.
_RECORDED_SPINDLE = {"codebooks": "on", "allocator.min_slots": 256, "salient.tokens": 0, "mass": "off"}
CONFIGS = {
    "streaming": ("streaming", {}),
    "snapkv": ("snapkv", {}),
    "pyramidkv": ("pyramidkv", {}),
    "spindle": ("spindle", _RECORDED_SPINDLE),
    "spindle-paper": ("spindle-paper", {"copy_spans": "on"}),
    "spindle-cb2": ("spindle", {**_RECORDED_SPINDLE, "codebooks.layers": 2}),
    "spindle-flat-max": ("spindle", {"codebooks": "on", "salient.tokens": 0, "allocator": "flat",
                                     "selector.rule": "max", "mass": "off"}),
    "spindle-window-only": ("spindle", {"codebooks": "on", "salient": "off", "copy_spans": "off",
                                        "allocator.min_slots": 256, "mass": "off"}),
}
BUDGETS = (0.4, 0.25, 0.15)


def _inputs(kind: str):
    """The recorded inputs: salient runs flagged, or re-plan inputs with absent (token, head) pairs."""
    layers = make_layers(GEO, n=160, w=8, r=12, seed=1)
    for inp in layers:
        if kind == "salient":
            pos = np.asarray(inp.positions)
            inp.salient = (((pos * 7) % 23) == 0).astype(np.float64) * (1.0 + (pos % 3))
        else:
            rng = np.random.default_rng(100 + inp.layer)
            a = rng.random((inp.n, GEO.n_head_kv)) > 0.2
            a[np.asarray(inp.positions) < 4] = True
            inp.available = a
    return layers


def _input_digest(layers) -> str:
    h = hashlib.sha256()
    for inp in layers:
        for a in (inp.k, inp.k_pre, inp.v, inp.positions, inp.q_window, inp.q_positions, inp.k_recent,
                  inp.v_recent, inp.available, inp.salient):
            if a is not None:
                h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def _head_digest(role: str, hs) -> str:
    """Role, kept tokens, query-head masks and codebook assignments of one KV head."""
    h = hashlib.sha256(role.encode())
    h.update(np.asarray(hs.token_index, np.int64).tobytes())
    h.update(np.packbits(np.asarray(hs.qmask, bool)).tobytes())
    for cb in (hs.k_codebook, hs.v_codebook):
        h.update(b"-" if cb is None else np.asarray(cb.index, np.int64).tobytes())
    return h.hexdigest()[:16]


@pytest.mark.parametrize("kind", ["salient", "available"])
def test_presets_reproduce_the_recorded_plans(kind):
    recorded = json.loads(RECORDED.read_text())
    layers = _inputs(kind)
    assert _input_digest(layers) == recorded[f"inputs/{kind}"], "the synthetic inputs changed"
    full = full_cache_bytes(layers[0].n + 12, GEO.n_layer, GEO.n_head_kv, GEO.head_dim_k, GEO.head_dim_v)
    differ = []
    for cname, (name, settings) in CONFIGS.items():
        for b in BUDGETS:
            pol = make_policy(name, settings, PlanContext(sinks=4, threads=1))
            for st in pol.plan(layers, GEO, int(full * b)):
                key = f"{kind}|{cname}|{b}|{st.layer}"
                if [_head_digest(st.role, hs) for hs in st.heads] != recorded[key]:
                    differ.append(key)
    assert not differ, f"plans differ from the recorded ones: {differ[:8]}"


def test_presets_are_built_from_stages():
    assert set(PRESETS) == {"streaming", "snapkv", "pyramidkv", "spindle", "spindle-paper"}
    sp = preset("spindle")
    assert isinstance(sp.allocator, MassShares) and sp.copy_spans and sp.salient and sp.codebooks is None
    assert isinstance(preset("spindle-paper").codebooks, Codebooks)
    paper = preset("spindle-paper")
    assert isinstance(paper.allocator, PyramidShares) and paper.copy_spans is None and paper.salient is None
    assert (paper.selector.rule, paper.selector.masks) == ("union", "own")
    assert preset("snapkv").codebooks is None
    assert preset("spindle") is not preset("spindle")  # fresh copies: settings never leak


def test_settings_apply_kinds_then_fields():
    st = apply_settings(preset("spindle"), {"allocator.beta": "10", "allocator": "pyramid", "salient": "off",
                                            "codebooks.layers": "2", "codebooks": "on",
                                            "scorer.value_weight": "no"})
    assert isinstance(st.allocator, PyramidShares) and st.allocator.beta == 10.0
    assert st.salient is None and st.codebooks.layers == 2 and st.scorer.value_weight is False
    assert preset("spindle").salient is not None  # the preset itself is unchanged
    settings = st.settings()
    assert settings["allocator"] == "pyramid" and settings["salient"] == "off"
    assert settings["codebooks.layers"] == 2 and "salient.share" not in settings


@pytest.mark.parametrize("settings,match", [
    ({"bogus.x": 1}, "unknown stage"),
    ({"allocator.floor": 0.2, "allocator": "flat"}, "FlatShares has no setting 'floor'"),
    ({"salient.share": 0.1, "salient": "off"}, "stage is off"),
    ({"allocator": "wide"}, "choose from flat, pyramid, mass"),
    ({"codebooks.theta_k": "high", "codebooks": "on"}, "expected float"),
    ({"codebooks.theta_k": 1.5, "codebooks": "on"}, r"in \(0, 1\]"),
    ({"scorer": "recency", "codebooks": "on"}, "codebook layers need the window scorer"),
    ({"codebooks.layers": 2}, r"codebooks stage is off in this policy \(--set codebooks=on first\)"),
])
def test_bad_settings_are_one_clear_error(settings, match):
    with pytest.raises(ValueError, match=match):
        apply_settings(preset("spindle"), settings)


def test_every_setting_key_is_reachable():
    # every stage field can be set, with its help text (the option table shows it)
    switch = {"allocator.beta": {"allocator": "pyramid"}}
    for key, text in setting_keys().items():
        assert text, key
        if "." not in key:
            continue
        slot, _, field = key.partition(".")
        st = apply_settings(preset("spindle"), switch.get(key, {slot: "on"} if slot == "codebooks" else {}))
        value = getattr(getattr(st, slot), field)
        changed = 1 if value is None else value
        got = apply_settings(st, {key: changed})
        assert getattr(getattr(got, slot), field) == changed


def test_evicted_mass_is_on_in_spindle_only():
    assert preset("spindle").mass is not None and preset("spindle").mass.share == 0.5
    assert all(preset(n).mass is None for n in ("streaming", "snapkv", "pyramidkv", "spindle-paper"))
    assert apply_settings(preset("spindle"), {"mass": "off"}).mass is None


def test_codebook_candidates_follow_the_stage():
    assert Codebooks().candidates(30) == 3 and Codebooks(layers=5).candidates(30) == 5
    assert Codebooks(max_layers=1).candidates(30) == 1
    assert make_policy("snapkv").codebook_candidates(30) == 0
    assert make_policy("spindle").codebook_candidates(30) == 0
    assert make_policy("spindle", {"codebooks": "on"}).codebook_candidates(30) == 3
    assert make_policy("spindle", {"codebooks": "on", "codebooks.layers": 2}).codebook_candidates(30) == 2
    with pytest.raises(ValueError, match="no stage settings"):
        make_policy("full", {"salient.share": 0.1})


def test_the_option_table_names_every_policy():
    # runtime/config.py lists the names without importing the policy package (fast --help)
    from spindle_local.policy import POLICY_NAMES
    from spindle_local.runtime.config import POLICIES

    assert POLICIES == POLICY_NAMES
