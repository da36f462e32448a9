"""The compressed store on every common model family (tiny random-weight GGUFs).

Each non-sliding-window family (:mod:`spindle_local.testing.tiny_families`: Llama 3.1
with ``rope_freqs``, Qwen2 with Q/K/V biases, Qwen3 with Q/K norms, Phi-3 with fused
QKV and gate/up, Mistral) runs over a matrix of attention shapes that together covers
query-heads per KV head 1, 3, 4, 7 and 8 and head sizes 64, 128 and 256:

* lossless store: a store gathered from every old token gives the full cache's
  logits, on the joined (prompt chunk) and split (one token) paths, with and without
  flash attention (tolerances of tests/test_backend_plan.py and tests/test_store.py;
  with flash attention the split path is held to the full cache computed without it),
  and the same step without the store gives other logits;
* codebooks: a store of one codebook entry per token, keys turned back before RoPE the
  way the engine does it, gives the full cache's logits (tests/test_store.py's
  tolerance), and an engine that keeps layer 0 as a codebook scores the store in the
  patch as the numpy reference does on the host (tests/test_backend_plan.py's check);
* budgets: a compressed conversation keeps the reserve ratio within ``kv_budget``
  whenever a prompt has been read and after every generated token
  (tests/test_budgets.py's check), through several compressions.

Gemma 3 (interleaved sliding-window attention) runs the same tests on its global layers;
its window layers keep llama.cpp's own cache and flash-attention setting, so where a
check compares across flash attention on and off, its tolerance widens by the spread of
the two full caches. A prompt chunk forced onto the plain joined path
(``LLAMA_SPINDLE_JOINED_PLAIN``, what a device without per-head flash masks runs) is held
to the full cache without flash attention.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from spindle_local.errors import SpindleError
from spindle_local.policy.plan import Codebook, HeadStore, LayerStore
from spindle_local.runtime import native
from spindle_local.runtime.config import POLICIES, EngineConfig
from spindle_local.runtime.engine import Engine
from spindle_local.runtime.lowlevel import LlamaContext, LlamaModel
from spindle_local.testing.tiny_families import FAMILIES, FamilySpec, write_tiny_family
from tests.test_backend_plan import _compare_scores

# (family, n_head, n_head_kv, head_dim, n_embd); qwen2 and phi3 need n_embd == n_head * head_dim
CASES = [
    ("llama", 8, 1, 64, 128),
    ("llama", 3, 1, 256, 96),
    ("qwen2", 4, 4, 64, 256),
    ("qwen2", 7, 1, 64, 448),
    ("qwen3", 4, 1, 256, 128),
    ("qwen3", 8, 2, 128, 128),
    ("phi3", 3, 1, 128, 384),
    ("phi3", 8, 1, 64, 512),
    ("mistral", 4, 4, 128, 128),
    ("mistral", 7, 1, 128, 128),
    ("gemma3", 8, 1, 64, 128),
    ("gemma3", 4, 1, 256, 128),
]
IDS = [f"{f}-h{h}-kv{kv}-d{d}" for f, h, kv, d, _ in CASES]
GEMMA = {"n_layer": 4, "n_embd": 128, "n_head": 4, "n_head_kv": 2, "head_dim": 64, "n_swa": 32, "swa_pattern": 2}

# max |logits - full cache's|: lossless store without / with flash attention, one-entry codebook.
# A one-entry codebook key is the pre-RoPE key rounded to f16 and re-roped in f32, where the
# cache holds the post-RoPE key rounded to f16: one more rounding per key, which the CPU's
# f16 product kernels turn into up to 5.4e-3 on an AVX-512 CPU (gemma3-h8-kv1-d64), against
# under 5e-3 on AVX2; still 5 times below MATTERS.
LOSSLESS_ATOL = {False: 2e-3, True: 5e-3}
CODEBOOK_ATOL = 1e-2
MATTERS = 5e-2  # dropping the stored tokens moves the logits by more than this
# One thread: models this small gain nothing from more, and ggml's spinning workers slow
# down several times over when the machine's cores are busy with other work.
THREADS = 1


def test_matrix_covers_the_shapes() -> None:
    assert {h // kv for _, h, kv, _, _ in CASES} == {1, 3, 4, 7, 8}
    assert {d for _, _, _, d, _ in CASES} == {64, 128, 256}
    fams = [c[0] for c in CASES]
    assert all(fams.count(f) >= 2 for f in ("llama", "qwen2", "qwen3", "phi3", "mistral", "gemma3"))


@pytest.mark.parametrize("family", FAMILIES)
def test_family_files_carry_their_structure(tmp_path: Path, family: str) -> None:
    """The tensors and keys that set each family apart are in the file (read back with gguf)."""
    from gguf import GGUFReader

    cfg = {"n_embd": 64, "n_head": 4, "n_head_kv": 2, "head_dim": 16}
    spec = write_tiny_family(tmp_path / f"{family}.gguf", family, **cfg)
    r = GGUFReader(spec.path)
    names = {t.name: t for t in r.tensors}
    arch = r.fields["general.architecture"].contents()
    assert arch == spec.architecture == ("llama" if family == "mistral" else family)
    blk = {n[len("blk.0."):] for n in names if n.startswith("blk.0.")}
    assert ("rope_freqs.weight" in names) == (family == "llama")
    if family == "llama":
        f = np.asarray(names["rope_freqs.weight"].data, np.float64)
        assert f.shape == (8,) and f[0] == 1.0 and f[-1] == 8.0 and np.all(np.diff(f) >= 0)
        np.testing.assert_allclose(f, spec.rope_factors)
    assert ({"attn_q.bias", "attn_k.bias", "attn_v.bias"} <= blk) == (family == "qwen2")
    assert ({"attn_q_norm.weight", "attn_k_norm.weight"} <= blk) == (family in ("qwen3", "gemma3"))
    assert ("attn_qkv.weight" in blk) == (family == "phi3") == ("attn_q.weight" not in blk)
    assert ("ffn_gate.weight" not in blk) == (family == "phi3")
    if family == "phi3":
        assert list(names["blk.0.ffn_up.weight"].shape) == [64, 2 * 128]  # ggml order: {n_embd, 2 n_ff}
        assert list(names["blk.0.attn_qkv.weight"].shape) == [64, 64 + 2 * 32]
    assert ({"post_attention_norm.weight", "post_ffw_norm.weight"} <= blk) == (family == "gemma3")
    assert ("output.weight" in names) == (family != "gemma3")  # Gemma ties its output to the embeddings
    swa = f"{arch}.attention.sliding_window"
    assert (swa in r.fields) == (family == "gemma3")
    if family == "gemma3":
        assert r.fields[swa].contents() == spec.n_swa and spec.swa_layers == (0,)
    if family in ("qwen2", "phi3"):
        with pytest.raises(ValueError, match="n_embd == n_head"):
            write_tiny_family(tmp_path / "bad.gguf", family, n_embd=96, n_head=4, n_head_kv=2, head_dim=16)


class _Models:
    """Each case's GGUF, written and loaded on first use, shared by the tests of this module."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.specs: dict[str, FamilySpec] = {}
        self.models: dict[str, LlamaModel] = {}

    def get(self, key: str, family: str, **cfg) -> tuple[FamilySpec, LlamaModel]:
        if key not in self.models:
            spec = write_tiny_family(self.root / f"{key}.gguf", family, seed=len(self.specs) + 31, **cfg)
            self.specs[key] = spec
            self.models[key] = LlamaModel(spec.path)
        return self.specs[key], self.models[key]

    def case(self, i: int) -> tuple[FamilySpec, LlamaModel]:
        family, n_head, n_head_kv, head_dim, n_embd = CASES[i]
        extra = {"n_layer": 4, "n_swa": 32} if family == "gemma3" else {}  # two window, two global layers
        return self.get(IDS[i], family, n_head=n_head, n_head_kv=n_head_kv, head_dim=head_dim, n_embd=n_embd,
                        **extra)

    def close(self) -> None:
        for m in self.models.values():
            m.close()


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory):
    m = _Models(Path(tmp_path_factory.mktemp("families")))
    yield m
    m.close()


def _engine(spec: FamilySpec, model: LlamaModel, **kw) -> Engine:
    cfg = EngineConfig(**{"policy": "spindle", "kv_budget": 0.25, "n_cells": 512, "recent": 64, "chunk": 128,
                          "n_threads": THREADS, "flash_attn": False, **kw})
    return Engine(spec.path, cfg, model=model)


def _tokens(spec: FamilySpec, n: int, seed: int = 0) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(3, spec.n_vocab - 1, n)]


def _check_geometry(eng: Engine, spec: FamilySpec) -> None:
    """The runtime sees the shape the file was written with."""
    lg = eng.geometry.layers[0]
    assert (eng.geometry.n_layer, lg.n_head, lg.n_head_kv, lg.head_dim_k, lg.head_dim_v, lg.n_rot) == (
        spec.n_layer, spec.n_head, spec.n_head_kv, spec.head_dim, spec.head_dim, spec.head_dim)
    assert eng.geometry.rope_type == {"norm": 0, "neox": 2}[spec.rope_type]
    assert tuple(eng.geometry.swa_layers()) == tuple(spec.swa_layers)
    # the store serves every layer but a sliding-window model's window layers
    assert eng.store_layer_ids == [il for il in range(spec.n_layer) if il not in spec.swa_layers]


def _old_cells(eng: Engine, il: int, p1: int) -> np.ndarray:
    """The cells of layer ``il`` holding positions [0, p1), in position order (read in the patch)."""
    sc = native.layer_scores(eng.ctx, il, np.zeros((1, eng.pgeo.n_head, eng.pgeo.head_dim_k), np.float32),
                             np.array([10_000], np.int32), 0.1, 0, eng.cells)
    cells = np.nonzero((sc.cell_pos >= 0) & (sc.cell_pos < p1))[0]
    return cells[np.argsort(sc.cell_pos[cells])]


def _unit(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mag = np.linalg.norm(x, axis=-1).astype(np.float32)
    return (x / np.maximum(mag, 1e-30)[..., None]).astype(np.float32), mag


def _one_entry_codebook(eng: Engine, il: int, p1: int) -> LayerStore:
    """Positions [0, p1) of layer ``il`` as K and V codebooks with one entry per token; the keys
    turned back before RoPE by the engine's own inverse rotation (as its plans build codebooks)."""
    lg = eng.geometry.layers[il]
    k, v, pos = eng.ctx.read_layer_kv(il)
    sel = pos < p1
    order = np.argsort(pos[sel])
    k, v, pos = k[sel][order], v[sel][order], pos[sel][order]
    k_pre = eng._unrope(il, k, pos)
    heads = []
    for h in range(lg.n_head_kv):
        books = []
        for x in (k_pre[:, h], v[:, h]):
            u, mag = _unit(x)
            books.append(Codebook(entries=u, index=np.arange(len(u), dtype=np.int32), magnitude=mag))
        heads.append(HeadStore(positions=pos.astype(np.int32), qmask=np.ones((lg.group_size, len(pos)), bool),
                               k_codebook=books[0], v_codebook=books[1]))
    return LayerStore(layer=il, heads=heads, role="codebook")


def _store_then_compare(models: _Models, i: int, flash_attn: bool, install, atol: float,
                        joined_plain: bool = False) -> None:
    """Feed 200 tokens to full-cache engines; in one, ``install(eng, layer, 150)`` puts positions
    [0, 150) of every layer in the store and they leave the cache. It then reads 60 tokens
    (joined path) and one more (split path): the logits must agree with the full cache's
    within ``atol``; without the store they must not.

    With flash attention the split path is held to the full cache without it: one-token
    decodes over a store do not run ggml's flash kernel, whose f16 accumulation alone moves
    the full cache's logits by up to 7e-3 here (200 keys of up to 256 dims; measured)."""
    spec, model = models.case(i)
    eng = _engine(spec, model, policy="full", flash_attn=flash_attn)
    # full caches: refs[0] without flash attention, refs[-1] with the same setting as ``eng``
    refs = [_engine(spec, model, policy="full", flash_attn=fa) for fa in sorted({flash_attn, False})]
    try:
        _check_geometry(eng, spec)
        toks = _tokens(spec, 262, seed=5 + i)
        eng.feed(toks[:200])
        for r in refs:
            r.feed(toks[:200])
        native.capture(eng.ctx, 0)  # the store's configuration exists before the first gather
        for il in eng.store_layer_ids:
            install(eng, il, 150)
        native.seq_rm(eng.ctx, 0, 150)  # window layers (gemma3) keep their window
        eng.ctx.compact()
        eng._store_layers = set(eng.store_layer_ids)
        assert eng.regular_count() == 50
        a = eng.feed(toks[200:260])  # joined path (a prompt chunk)
        b = [r.feed(toks[200:260]) for r in refs]
        if joined_plain:
            _assert_non_flash(eng, a, b, atol, "joined path")
        else:
            diff = float(np.abs(a - b[-1]).max())
            assert diff < atol, f"joined path: max |store - full| = {diff:.2e}"
        a = eng.step(toks[260])  # split path (one token)
        b = [r.step(toks[260]) for r in refs]
        _assert_non_flash(eng, a, b, atol, "split path")
        assert a.argmax() == b[0].argmax() == b[-1].argmax()
        # the stored tokens matter: the same step without them gives other logits
        eng.ctx.store_clear()
        eng.ctx.seq_rm(260, -1)
        eng.ctx.decode([toks[260]], [260])
        assert float(np.abs(eng.ctx.logits() - b[0]).max()) > MATTERS
    finally:
        eng.close()
        for r in refs:
            r.close()


def _assert_non_flash(eng: Engine, a: np.ndarray, refs: list[np.ndarray], atol: float, what: str) -> None:
    """``a`` came from non-flash math on the store's layers: within ``atol`` of the full cache
    without flash attention (``refs[0]``). A sliding-window model's window layers keep flash
    attention, so there the logits are a mix of the two full caches', within their spread."""
    spread = float(np.abs(refs[0] - refs[-1]).max()) if eng.geometry.swa_layers() else 0.0
    diff = min(float(np.abs(a - r).max()) for r in (refs if spread else refs[:1]))
    assert diff < atol + spread, f"{what}: max |store - full| = {diff:.2e} (full caches: {spread:.2e})"


def _gather_all(eng: Engine, il: int, p1: int) -> None:
    cells = _old_cells(eng, il, p1)
    assert len(cells) == p1
    hkv, g = eng.pgeo.n_head_kv, eng.pgeo.g
    native.store_gather(eng.ctx, il, np.full(hkv, len(cells), np.int32),
                        np.tile(cells.astype(np.int32), (hkv, 1)), np.ones((hkv * g, len(cells)), np.uint8))


def _codebook_all(eng: Engine, il: int, p1: int) -> None:
    eng.ctx.store_set(il, _one_entry_codebook(eng, il, p1))


# -- lossless store ------------------------------------------------------------------------------


@pytest.mark.model
@pytest.mark.parametrize("flash_attn", [False, True], ids=["nofa", "fa"])
@pytest.mark.parametrize("i", range(len(CASES)), ids=IDS)
def test_store_of_every_token_keeps_the_logits(models: _Models, i: int, flash_attn: bool) -> None:
    _store_then_compare(models, i, flash_attn, _gather_all, LOSSLESS_ATOL[flash_attn])


@pytest.mark.model
@pytest.mark.parametrize("i", range(len(CASES)), ids=IDS)
def test_joined_plain_path_keeps_the_logits(models: _Models, i: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """With flash attention on a device whose kernel takes no per-head mask (CUDA), a prompt
    chunk over a store runs plain attention math on that device (forced here with
    LLAMA_SPINDLE_JOINED_PLAIN): the logits are the full cache's without flash attention."""
    monkeypatch.setenv("LLAMA_SPINDLE_JOINED_PLAIN", "1")
    _store_then_compare(models, i, True, _gather_all, LOSSLESS_ATOL[True], joined_plain=True)


# -- codebooks ---------------------------------------------------------------------------------


@pytest.mark.model
@pytest.mark.parametrize("i", range(len(CASES)), ids=IDS)
def test_codebook_of_every_token_keeps_the_logits(models: _Models, i: int) -> None:
    """The patch rebuilds each key from its entry and re-ropes it at the slot's position;
    with one entry per token that must give back the keys the model cached."""
    _store_then_compare(models, i, False, _codebook_all, CODEBOOK_ATOL)


@pytest.mark.model
@pytest.mark.parametrize("i", range(len(CASES)), ids=IDS)
def test_codebook_layer_scores_match_the_reference(models: _Models, i: int) -> None:
    """Layer 0 kept as a codebook by the engine's plans: the window scores the patch computes
    over the store (codebook keys re-roped there) equal the numpy reference on the store as
    the engine reads it back to the host."""
    spec, model = models.case(i)
    eng = _engine(spec, model, stages={"codebooks": "on", "codebooks.layers": 1})
    try:
        toks = _tokens(spec, 700, seed=40 + i)
        eng.feed(toks)
        first, last = eng.store_layer_ids[0], eng.store_layer_ids[-1]
        assert eng.stats.compressions >= 1 and first in eng._store_layers
        st = eng.ctx.store_get(first)
        if not spec.swa_layers:
            # the first layer sees token embeddings: repeated tokens give repeated keys and
            # values, which a codebook shares (a window model's first global layer comes after
            # a window layer, with no repeats; its codebook path is the one-entry test above)
            assert st.heads and all(h.k_codebook is not None and h.v_codebook is not None for h in st.heads)
        deep = eng.ctx.store_get(last).heads  # an eviction layer: raw rows
        assert deep and all(h.k_raw is not None for h in deep)
        _compare_scores(eng, cut=eng.n_past - 64)
        logits = eng.step(toks[0])
        assert np.isfinite(logits).all()
    finally:
        eng.close()


# -- budgets -----------------------------------------------------------------------------------


@pytest.mark.model
@pytest.mark.parametrize("i", range(len(CASES)), ids=IDS)
def test_budget_holds_through_compressions(models: _Models, i: int) -> None:
    """Small ``recent``/``chunk`` so that 400 prompt tokens and 100 generated ones plan
    several times; the reserve ratio is within the budget whenever ``feed`` returns and
    after every step."""
    spec, model = models.case(i)
    # a window model's window layers (256 cells here) count alike in the budget of every policy
    # and of the full cache: 0.25 is out of reach below ~800 tokens, 0.6 from ~200
    budget = 0.6 if spec.swa_layers else 0.25
    eng = _engine(spec, model, kv_budget=budget, n_cells=None, recent=32, chunk=64, keep_start=16,
                  decode_slack=32, flash_attn=True)
    try:
        toks = _tokens(spec, 400, seed=60 + i)
        logits = None
        for a in range(0, 400, 100):
            logits = eng.feed(toks[a:a + 100])
            s = eng.refresh_stats()
            if s.compressions:
                assert s.reserve_ratio <= budget + 1e-9, (a, s.as_dict())
        assert eng.stats.compressions >= 2
        for _ in range(100):
            logits = eng.step(int(np.argmax(logits)))
            assert np.isfinite(logits).all()
            s = eng.refresh_stats()
            assert s.reserve_ratio <= budget + 1e-9, s.as_dict()
        assert s.compressions >= 4 and s.over_budget_compressions == 0, s.as_dict()
        assert 0 < s.store_bytes and s.regular_bytes <= eng.cells * eng.bytes_per_token + eng.fixed_bytes
    finally:
        eng.close()


# -- gemma3: sliding-window layers -------------------------------------------------------------


@pytest.fixture(scope="module")
def gemma(models: _Models) -> tuple[FamilySpec, LlamaModel]:
    return models.get("gemma3", "gemma3", **GEMMA)


@pytest.mark.model
def test_gemma3_full_policy_runs(gemma) -> None:
    """Interleaved sliding-window layers load as such, and ``--policy full`` reads past the
    window with the plain context's logits."""
    spec, model = gemma
    assert spec.swa_layers == (0, 2)
    toks = _tokens(spec, 200, seed=7)
    eng = Engine(spec.path, EngineConfig(policy="full", n_cells=512, chunk=128, n_threads=THREADS, flash_attn=False),
                 model=model)
    try:
        g = eng.geometry
        assert g.swa_layers() == list(spec.swa_layers) and g.n_swa == spec.n_swa
        assert [lg.freq_base for lg in g.layers] == [spec.rope_base_swa, spec.rope_base] * 2
        eng.feed(toks[:150])
        logits = eng.feed(toks[150:199])
        assert logits.shape == (spec.n_vocab,) and np.isfinite(logits).all()
        step = eng.step(toks[199])
        assert np.isfinite(step).all()
        assert eng.stats.compressions == 0 and eng.refresh_stats().reserve_ratio == 1.0
    finally:
        eng.close()
    with LlamaContext(model, n_ctx=512, n_batch=128, n_threads=THREADS) as ctx:
        ctx.decode(toks[:150], logits="none")
        ctx.decode(toks[150:199])
        ctx.decode(toks[199:])
        want = ctx.logits()
    assert float(np.abs(step - want).max()) < 1e-3
