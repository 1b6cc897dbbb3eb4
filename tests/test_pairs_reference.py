"""The pairs and balance kernels against plain, slow, obviously correct Python on random small inputs.

The reference below loops over prompts and pairs with dicts and `unicodedata`: no hashing, no
numpy. Hypothesis draws prompts whose texts collide in every way the rules care about (equal
texts, texts equal only after NFKC / whitespace normalisation, repeated prompts under other ids,
tied scores and margins, unsafe candidates) and checks identical pair ids, margins and funnel
counts, for both identity rules and both tie breaks.
"""

from __future__ import annotations

import re
import unicodedata

import numpy as np
import pyarrow as pa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dpoflow.storage.schemas import conform
from dpoflow.tasks.balance import BalanceConfig, balance_pairs
from dpoflow.tasks.ids import stable_id_one
from dpoflow.tasks.pairs import PairsConfig, build_pairs
from dpoflow.tasks.text import unit_interval, unit_length
from dpoflow.tasks.text_keys import normalized

# pieces that make texts equal raw, equal only after normalisation, CJK, and exact-path characters
PIECES = ["a", "b", "A", "Ａ", "１", "1", " ", "  ", "\n", "\t", "\u3000", "你", "好", "，", ",", "。", "é", "e\u0301",
          "\v", "…", "x y", "２０２４"]
TEXT = st.lists(st.sampled_from(PIECES), min_size=0, max_size=6).map("".join)
# random texts of assigned code points: on unassigned ones Arrow's NFKC (utf8proc, a newer Unicode)
# and Python's unicodedata (Unicode 14) differ, e.g. U+058B -> U+056B in Arrow only
ANY_TEXT = st.text(st.characters(exclude_categories=("Cs", "Cn")), max_size=12)
SCORE = st.sampled_from([None, 0.0, 0.5, 1.0, 1.5, 2.0, 3.25])


# --- the reference -----------------------------------------------------------------------------

def ref_normalize(s: str) -> str:
    return re.sub(r"[ \t\n\r\f]+", " ", unicodedata.normalize("NFKC", s)).strip()


CJK = re.compile(r"[\u3040-\u30FF\u3400-\u4DBF\u4E00-\u9FFF\uAC00-\uD7AF\uF900-\uFAFF\U00020000-\U0002A6DF]")
WORD = re.compile(r"[^\W_]+")


def ref_units(s: str) -> int:
    s = unicodedata.normalize("NFKC", s)
    return len(CJK.findall(s)) + len(WORD.findall(CJK.sub(" ", s)))


def ref_pairs(cands: list[dict], score: dict, unsafe: set, min_margin: float, cap: int | None
              ) -> tuple[list[dict], dict]:
    """all_pairs over the metrics source, safe beats unsafe, ties / unsafe chosen / min margin / cap."""
    seen, rows = set(), []
    for c in cands:
        if c["candidate_id"] not in seen:
            seen.add(c["candidate_id"])
            rows.append(c)
    dropped = {"single_candidate": 0, "tie": 0, "unsafe_chosen": 0, "below_min_margin": 0}
    if len(rows) < len(cands):
        dropped["duplicate_candidate"] = len(cands) - len(rows)
    by_prompt: dict[str, list[dict]] = {}
    for c in rows:
        by_prompt.setdefault(c["prompt_id"], []).append(c)
    out, considered = [], 0
    for pid in sorted(by_prompt):
        group = sorted(by_prompt[pid], key=lambda c: c["candidate_id"])
        dropped["single_candidate"] += len(group) == 1
        kept = []
        for i in range(len(group)):
            for j in range(i + 1, len(group)):
                a, b = group[i], group[j]
                considered += 1
                ua, ub = a["candidate_id"] in unsafe, b["candidate_id"] in unsafe
                if ua != ub:
                    ch, rj = (b, a) if ua else (a, b)
                    cs, rs, margin = 1.0, 0.0, 1.0
                else:
                    sa, sb = score.get(a["candidate_id"]), score.get(b["candidate_id"])
                    if sa is None or sb is None or abs(sa - sb) <= 1e-9:
                        dropped["tie"] += 1
                        continue
                    ch, rj = (a, b) if sa > sb else (b, a)
                    if ch["candidate_id"] in unsafe:
                        dropped["unsafe_chosen"] += 1
                        continue
                    cs, rs = score[ch["candidate_id"]], score[rj["candidate_id"]]
                    margin = cs - rs
                if margin < min_margin:
                    dropped["below_min_margin"] += 1
                    continue
                kept.append({"prompt_id": pid, "prompt": ch["prompt"], "chosen": ch["response"],
                             "rejected": rj["response"], "chosen_id": ch["candidate_id"],
                             "rejected_id": rj["candidate_id"], "margin": margin, "cs": cs, "rs": rs,
                             "pos": (group.index(rj), group.index(ch))})
        if cap is not None:
            kept.sort(key=lambda p: (-p["margin"], p["pos"]))
            dropped["cap"] = dropped.get("cap", 0) + max(0, len(kept) - cap)
            kept = kept[:cap]
        out += kept
    for p in out:
        p["pair_id"] = stable_id_one(p["prompt_id"], p["chosen_id"], p["rejected_id"])
    dropped["considered"] = considered
    return out, dropped


def ref_balance(pairs: list[dict], identity: str, tie_break: str, cap: int | None) -> tuple[list[dict], dict]:
    """empty, identical, duplicate, prompt cap (near-dup, mixes and length band off)."""
    norm = ref_normalize if identity == "normalized" else (lambda s: s)
    dropped = {}
    rest = [p for p in pairs if ref_normalize(p["chosen"]) and ref_normalize(p["rejected"])]
    dropped["empty"] = len(pairs) - len(rest)
    keep = [p for p in rest if norm(p["chosen"]) != norm(p["rejected"])]
    dropped["identical"] = len(rest) - len(keep)
    first: dict[tuple, dict] = {}

    def id_key(p: dict) -> tuple:
        return (p["pair_id"],) if tie_break == "hash" else (p["prompt_id"], p["chosen_id"], p["rejected_id"])

    for p in keep:
        k = (norm(p["prompt"]), norm(p["chosen"]), norm(p["rejected"]))
        if k not in first or id_key(p) < id_key(first[k]):
            first[k] = p
    dedup = [p for p in keep if first[(norm(p["prompt"]), norm(p["chosen"]), norm(p["rejected"]))] is p]
    dropped["duplicate"] = len(keep) - len(dedup)
    if cap is not None and dedup:  # the stage skips a step that has no rows
        by_prompt: dict[str, list[dict]] = {}
        for p in dedup:
            by_prompt.setdefault(p["prompt_id"], []).append(p)

        def tie(p: dict) -> tuple:
            if tie_break == "hash":
                return (float(unit_interval(pa.array([p["pair_id"]]), salt="cap:0:")[0]),)
            return (p["chosen_id"], p["rejected_id"])

        out = []
        for ps in by_prompt.values():
            out += sorted(ps, key=lambda p: (-p["margin"], tie(p)))[:cap]
        dropped["prompt_cap"] = len(dedup) - len(out)
        dedup = out
    return dedup, dropped


# --- the property --------------------------------------------------------------------------------

@st.composite
def workloads(draw: st.DrawFn) -> dict:
    prompt_texts = draw(st.lists(TEXT, min_size=1, max_size=3))
    cands, score, unsafe = [], {}, set()
    for p in range(draw(st.integers(1, 4))):
        ptext = draw(st.sampled_from(prompt_texts))
        for k in draw(st.lists(st.integers(0, 6), min_size=1, max_size=5)):
            cid = f"p{p}c{k}"
            cands.append({"candidate_id": cid, "prompt_id": f"p{p}", "prompt": ptext, "response": draw(TEXT),
                          "origin": "sampled", "model_version": "m1", "dup_count": 1})
            score[cid] = draw(SCORE)
            if draw(st.integers(0, 9)) == 0:
                unsafe.add(cid)
    return {"cands": cands, "score": score, "unsafe": unsafe, "min_margin": draw(st.sampled_from([0.0, 0.5, 1.0])),
            "pairs_cap": draw(st.sampled_from([None, 1, 2])), "cap": draw(st.sampled_from([None, 1, 2])),
            "identity": draw(st.sampled_from(["normalized", "raw"])),
            "tie_break": draw(st.sampled_from(["hash", "lowest_id"])), "pair_batch": draw(st.sampled_from([1, 5, 1 << 18]))}


def _tables(w: dict) -> tuple[pa.Table, pa.Table]:
    cand = conform("candidates", pa.Table.from_pylist(w["cands"]))
    ids = sorted(w["score"])
    sc = pa.Table.from_pylist([{"candidate_id": c, "prompt_id": "?", "auto_score": w["score"][c], "reward": None,
                                "flag_safety": c in w["unsafe"], "flag_pii": False, "flag_repetition": False,
                                "flag_length": False, "flag_refusal": False, "flag_language": False,
                                "flag_empty": False, "flag_reasons": []} for c in ids])
    return cand, conform("scores", sc)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workloads())
def test_pairs_and_balance_equal_the_reference(w):
    import dpoflow.tasks.pairs as pairs_mod

    cand, sc = _tables(w)
    batch, pairs_mod.PAIR_BATCH = pairs_mod.PAIR_BATCH, w["pair_batch"]  # prompts decided in batches of any size
    try:
        out, _, rep = build_pairs(cand, PairsConfig(min_margin=w["min_margin"], max_pairs_per_prompt=w["pairs_cap"]),
                                  scores=sc)
    finally:
        pairs_mod.PAIR_BATCH = batch
    ref, ref_dropped = ref_pairs(w["cands"], w["score"], w["unsafe"], w["min_margin"], w["pairs_cap"])
    got = {r["pair_id"]: (r["chosen_id"], r["rejected_id"], r["margin"], r["chosen_score"], r["rejected_score"])
           for r in out.to_pylist()}
    assert got == {p["pair_id"]: (p["chosen_id"], p["rejected_id"], p["margin"], p["cs"], p["rs"]) for p in ref}
    assert rep["considered"] == ref_dropped.pop("considered")
    assert {k: v for k, v in rep["dropped"].items() if v} == {k: v for k, v in ref_dropped.items() if v}

    cfg = BalanceConfig(near_dup=False, length_control=False, eval_fraction=0.0, plots=False,
                        max_pairs_per_prompt=w["cap"], identity=w["identity"], tie_break=w["tie_break"])
    train, evals, brep, _ = balance_pairs(out, cfg)
    kept, bdropped = ref_balance(ref, w["identity"], w["tie_break"], w["cap"])
    assert evals.num_rows == 0
    assert sorted(train.column("pair_id").to_pylist()) == sorted(p["pair_id"] for p in kept)
    assert brep["dropped"] == bdropped
    lens = [(ref_units(p["chosen"]), ref_units(p["rejected"])) for p in ref]
    if lens:
        assert brep["before"]["chosen_len_mean"] == round(float(np.mean([c for c, _ in lens])), 2)
        assert brep["before"]["chosen_longer_share"] == round(float(np.mean([c > r for c, r in lens])), 4)


# --- the text kernel against the Arrow path of tasks.text ----------------------------------------

@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(TEXT, ANY_TEXT), min_size=1, max_size=30))
def test_normalized_equals_the_reference(texts):
    arr = pa.array(texts + [None])
    assert normalized(arr).to_pylist() == [ref_normalize(t or "") for t in texts] + [""]


def test_normalized_on_long_mixed_texts_across_slices(monkeypatch):
    """Texts spanning several byte slices, each path at least once, in one array."""
    import dpoflow.tasks.text_codes as tc
    import dpoflow.tasks.text_keys as tk

    monkeypatch.setattr(tc, "CHUNK_BYTES", 64)
    monkeypatch.setattr(tk, "CHUNK_BYTES", 64)
    texts = ["请用简单的话解释，二分查找！\n\n" * 3, "Explain  binary\tsearch " * 4, "ＡＢＣ　１２３ done", "café au lait",
             "", "   ", "a\vb", "x"]
    arr = pa.chunked_array([texts[:3], texts[3:]])
    assert tk.normalized(arr).to_pylist() == [ref_normalize(t) for t in texts]
    assert tk.normalized(pa.array(texts[:3])).to_pylist() == [ref_normalize(t) for t in texts[:3]]  # fast path only


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(alphabet=["a", "b", "\x00", "é", "你", "z"], max_size=20), max_size=30), st.integers(0, 3))
def test_candidate_order_keys_sort_like_arrow(values, offset):
    """The numpy sort keys of ids (8-byte words + length) order strings exactly as Arrow does."""
    from dpoflow.tasks.pairs import _sort_words

    arr = pa.array(["pad"] * offset + values, pa.string()).slice(offset)
    keys = _sort_words(arr)
    got = [values[i] for i in np.lexsort(keys)]
    assert got == [values[i] for i in np.asarray(pa.compute.sort_indices(arr))]


# --- the identity keys and the columnar helpers against their plain forms ------------------------

@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(TEXT, ANY_TEXT), min_size=1, max_size=30))
def test_text_keys_never_separate_equal_normalised_texts(texts):
    """Equal normalised texts share a key; units and emptiness equal the Arrow / reference forms."""
    from dpoflow.tasks.text_keys import text_keys

    keys = text_keys(pa.array(texts + [None]))
    ref = [ref_normalize(t or "") for t in texts] + [""]
    assert keys.units.tolist() == unit_length(pa.array(texts + [None])).tolist()
    assert keys.empty.tolist() == [r == "" for r in ref]
    assert [int(k) & 0xFFFFFFFF for k in keys.key] == [len(r) - r.count(" ") for r in ref]
    for i in range(len(ref)):
        for j in range(len(ref)):
            if ref[i] == ref[j]:
                assert keys.key[i] == keys.key[j]


def test_text_keys_on_long_mixed_texts_across_slices(monkeypatch):
    import dpoflow.tasks.text_keys as tk

    monkeypatch.setattr(tk, "CHUNK_BYTES", 64)
    texts = ["请用简单的话解释，二分查找！\n\n" * 3, "Explain  binary\tsearch " * 4, "ＡＢＣ　１２３ done", "café au lait",
             "", "   ", "a\vb", "x", "", "Ａ１b２ 中文"]
    keys = tk.text_keys(pa.array(texts))
    assert keys.units.tolist() == [ref_units(t) for t in texts]
    assert [int(k) & 0xFFFFFFFF for k in keys.key] == [len(ref_normalize(t)) - ref_normalize(t).count(" ") for t in texts]


IDS = st.text(alphabet=["a", "b", "-", "1", "é", "你", "\x1f"], max_size=6)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.one_of(st.none(), IDS), IDS, IDS), max_size=20), st.sampled_from(["", "p-", "é"]),
       st.integers(1, 32))
def test_stable_id_equals_its_scalar_form(rows, prefix, length):
    """The columnar ids (batched blake2b, numpy hex) equal the plain per-row form, in any batching."""
    import dpoflow.tasks.ids as ids

    cols = [pa.array([r[i] for r in rows], pa.string()) for i in range(3)]
    want = [ids.stable_id_one(*r, prefix=prefix, length=length) for r in rows]
    assert ids.stable_id(*cols, prefix=prefix, length=length).to_pylist() == want
    batch, ids.ID_BATCH = ids.ID_BATCH, 3  # several batches
    try:
        assert ids.stable_id(*cols, prefix=prefix, length=length).to_pylist() == want
        assert ids.stable_id(cols[1], prefix=prefix, length=length).to_pylist() == [
            ids.stable_id_one(r[1], prefix=prefix, length=length) for r in rows]
    finally:
        ids.ID_BATCH = batch


@settings(max_examples=100, deadline=None)
@given(st.lists(st.one_of(st.none(), IDS), max_size=20), st.lists(st.one_of(st.none(), IDS), max_size=20),
       st.booleans())
def test_lookup_equals_index_in(keys, values, collide):
    """First position of each key, -1 when absent; with nulls (Arrow's path) and with every
    hash colliding (each hit is confirmed on the strings, the rest decided by Arrow)."""
    import dpoflow.tasks.pair_kernels as pk

    want = [values.index(k) if k in values else -1 for k in keys]
    hash_strings = pk.hash_strings
    if collide:
        pk.hash_strings = lambda a: np.zeros(len(a), np.uint64)
    try:
        got = pk.lookup(pa.array(keys, pa.string()), pa.chunked_array([pa.array(values, pa.string())]))
    finally:
        pk.hash_strings = hash_strings
    assert got.tolist() == want


LATIN_WORD_RE = re.compile(r"[A-Za-z\u00C0-\u024F]+")
CJK_CHAR_RE = re.compile(r"[\u3400-\u4DBF\u4E00-\u9FFF\uF900-\uFAFF\U00020000-\U0002A6DF]")


@settings(max_examples=100, deadline=None)
@given(st.lists(st.one_of(st.none(), TEXT, st.text(max_size=12)), max_size=20))
def test_detect_language_equals_the_reference(texts):
    from dpoflow.tasks.lang import detect_language

    def ref(t: str | None) -> str | None:
        if t is None:
            return None
        cjk, latin = len(CJK_CHAR_RE.findall(t)), len(LATIN_WORD_RE.findall(t))
        return "zh" if cjk + latin and cjk / (cjk + latin) >= 0.3 else "en" if latin else "und"

    assert detect_language(pa.array(texts, pa.string())).to_pylist() == [ref(t) for t in texts]


@settings(max_examples=100, deadline=None)
@given(st.lists(st.one_of(st.integers(0, 40), st.integers(0, 2**64 - 1)), max_size=40))
def test_sorted_order_is_a_stable_argsort(keys):
    """Small keys take the packed sort, large ones numpy's argsort: the same order either way."""
    from dpoflow.tasks.pair_kernels import first_and_inverse, sorted_order

    h = np.array(keys, np.uint64)
    assert sorted_order(h).tolist() == np.argsort(h, kind="stable").tolist()
    small = h % np.uint64(7)
    assert sorted_order(small).tolist() == np.argsort(small, kind="stable").tolist()
    first, inv = first_and_inverse(small)
    assert (small[first][inv] == small).all() and all(first[inv[i]] <= i for i in range(len(h)))


def test_distinct_texts_by_view_position_and_its_fallback():
    """Rows are grouped by where their views point; views that start at one place with other
    lengths (a prefix of a text) are not one text: grouped by the texts instead."""
    from dpoflow.tasks.balance import _distinct, _view_groups
    from dpoflow.tasks.pair_kernels import as_views, take_views

    data = b"abcdefghijklmnopqrstuvwxyz"
    views = np.zeros((3, 4), np.int32)
    for i, (length, off) in enumerate([(20, 0), (14, 0), (5, 3)]):  # 20 and 14 bytes from one offset
        views[i, 0] = length
        views[i, 1] = np.frombuffer(data[off:off + 4], np.int32)[0]
        views[i, 2:] = (0, off) if length > 12 else (0, 0)
        if length <= 12:
            inline = np.zeros(12, np.uint8)
            inline[:length] = np.frombuffer(data[off:off + length], np.uint8)
            views[i, 1:] = inline.view(np.int32)
    arr = pa.Array.from_buffers(pa.string_view(), 3, [None, pa.py_buffer(views.tobytes()), pa.py_buffer(data)])
    want = ["abcdefghijklmnopqrst", "abcdefghijklmn", "defgh"]
    assert arr.to_pylist() == want
    assert _view_groups([arr]) is None  # one position, two lengths: the texts decide
    same = take_views(arr, np.array([0, 2, 0, 2]))
    first, inv = _view_groups([same, take_views(arr, np.array([2]))])
    assert len(first) == 2 and inv.tolist() == [0, 1, 0, 1, 1]
    assert _view_groups([same, as_views(pa.array(want))]) is None  # other buffers
    for cols in ([arr], [same, take_views(arr, np.array([1, 2]))], [same, as_views(pa.array(want))]):
        texts = [x for c in cols for x in c.to_pylist()]
        uniq, _, inv = _distinct(*(pa.chunked_array([c]) for c in cols))
        assert [uniq.to_pylist()[i] for i in inv] == texts
        assert len(uniq) == len(set(texts))
