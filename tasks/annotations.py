"""Human annotations: parse exports into `annotations`, aggregate annotators into `judgements`.

Formats: JSONL / CSV rows (pairwise ``a, b, winner``; ranking ``ranking`` best first; rating
``item_id, rating``) and Label Studio's JSON export (tasks with ``annotations[].result[]`` of
type pairwise / choices / rating / ranker). Bad rows go to quarantine with a reason.

Aggregation (why each): several annotators disagree, so
- pairwise: majority vote per unordered pair (ties when tie votes lead or a and b are level);
  strength = winner's vote share;
- rating: mean per item; agreement = 1 - mean |r - mean| / (half the scale range);
- rankings, and prompts with pairwise votes over >= ``bt_min_items`` items: a Bradley-Terry fit
  (MM algorithm, Hunter 2004) over all implied pairwise wins, with ``bt_prior`` pseudo-games
  against a virtual average item so items that never lose stay finite.
Agreement per judgement, Fleiss' kappa for pairwise labels, and per-annotator reliability
(share of their labels agreeing with the consensus; Kendall tau mapped to [0, 1] for rankings).
Annotation sets are small (thousands of rows): clarity beats vectorisation here.
"""

from __future__ import annotations

import csv
import datetime as dt
import itertools
import json
import math
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from dpoflow.storage.schemas import ANNOTATIONS, JUDGEMENTS, QUARANTINE, TS
from dpoflow.tasks.contract import Section, StageContext, StageResult
from dpoflow.tasks.ids import stable_id_one
from dpoflow.tasks.importing import ImportError_, unseen_quarantine
from dpoflow.tasks.kernels import hash64

KINDS = ("pairwise", "ranking", "rating")
ITEM_KEYS = ("item_id", "response_id", "candidate_id", "id")


class AnnotationsConfig(Section):
    """How annotator labels become judgements."""

    bt_min_items: int = Field(3, ge=2, description="prompts whose pairwise votes span this many items also get a Bradley-Terry ranking")
    bt_prior: float = Field(0.5, ge=0, description="pseudo-games of every item against a virtual average item (regularises BT)")
    bt_iterations: int = Field(200, gt=0, description="max MM iterations of the Bradley-Terry fit")
    rating_min: float = Field(1.0, description="lowest point of the rating scale")
    rating_max: float = Field(5.0, description="highest point of the rating scale")


class AnnotationFormatError(ImportError_):
    """The file cannot be read as annotations at all."""


# --- parsing --------------------------------------------------------------------------------

def _text(v: Any) -> str | None:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    if isinstance(v, dict):  # Label Studio `completed_by` may be a user object
        v = v.get("email") or v.get("id") or v.get("username")
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    s = str(v).strip()
    return s or None


def _list(v: Any) -> list[str] | None:
    """A list of ids from a JSON list, a JSON string, or 'a>b>c' / 'a,b,c' / 'a|b' text."""
    if v is None:
        return None
    if isinstance(v, str):
        s = v.strip()
        if s.startswith("["):
            try:
                v = json.loads(s)
            except ValueError:
                return None
        else:
            for sep in (">", "|", ","):
                if sep in s:
                    return [p.strip() for p in s.split(sep) if p.strip()]
            return [s] if s else None
    if isinstance(v, list | tuple):
        out = [_text(x) for x in v]
        return None if any(x is None for x in out) else out  # type: ignore[return-value]
    return None


def _ts(v: Any) -> dt.datetime | None:
    if v in (None, ""):
        return None
    try:
        if isinstance(v, int | float):
            return dt.datetime.fromtimestamp(float(v) / (1000 if v > 1e11 else 1), dt.UTC)
        t = dt.datetime.fromisoformat(str(v).replace("Z", "+00:00"))
        return t if t.tzinfo else t.replace(tzinfo=dt.UTC)
    except (ValueError, OverflowError, OSError):
        return None


def normalise_row(row: dict[str, Any], cfg: AnnotationsConfig | None = None) -> tuple[dict[str, Any] | None, str | None]:
    """One flat record -> an ANNOTATIONS row, or (None, reason). With `cfg`, ratings off its
    scale are rejected (a 7 on a 1-5 Likert scale is an input error, not a strong vote)."""
    annotator = _text(row.get("annotator") or row.get("annotator_id") or row.get("user_id"))
    if annotator is None:
        return None, "missing annotator"
    kind = _text(row.get("kind"))
    items = _list(row.get("item_ids"))
    if kind is None:
        if row.get("ranking") is not None:
            kind = "ranking"
        elif row.get("rating") is not None:
            kind = "rating"
        elif row.get("a") is not None or row.get("winner") is not None:
            kind = "pairwise"
        else:
            return None, "unknown kind"
    kind = kind.lower()
    if kind not in KINDS:
        return None, "unknown kind"
    winner, rating = None, None
    if kind == "pairwise":
        if items is None:
            a, b = _text(row.get("a") or row.get("item_a")), _text(row.get("b") or row.get("item_b"))
            items = [a, b] if a and b else None
        if not items or len(items) != 2 or items[0] == items[1]:
            return None, "missing items"
        w = _text(row.get("winner"))
        if w is None:
            return None, "missing winner"
        wl = w.lower()
        if w in items:  # an item id first: ids such as "1", "2" or "A" must not read as a side
            winner = w
        elif wl in ("a", "left", "1"):
            winner = items[0]
        elif wl in ("b", "right", "2"):
            winner = items[1]
        elif wl in ("tie", "draw", "equal", "both", "neither"):
            winner = "tie"
        else:
            return None, "invalid winner"
    elif kind == "ranking":
        items = _list(row.get("ranking")) if items is None else items
        if not items or len(items) < 2 or len(set(items)) != len(items):
            return None, "invalid ranking"
    else:
        if items is None:
            item = next((_text(row.get(k)) for k in ITEM_KEYS if _text(row.get(k))), None)
            items = [item] if item else None
        if not items or len(items) != 1:
            return None, "missing items"
        try:
            rating = float(row.get("rating"))
        except (TypeError, ValueError):
            return None, "invalid rating"
        if not math.isfinite(rating):
            return None, "invalid rating"
        if cfg is not None and not cfg.rating_min <= rating <= cfg.rating_max:
            return None, "rating out of scale"
    prompt_id = _text(row.get("prompt_id"))
    key_items = sorted(items) if kind != "ranking" else items
    return {
        "annotation_id": stable_id_one(kind, annotator, prompt_id, "\x1e".join(key_items), prefix="ann-"),
        "kind": kind, "prompt_id": prompt_id, "annotator": annotator, "item_ids": items,
        "winner": winner, "rating": rating, "ts": _ts(row.get("ts") or row.get("created_at")),
    }, None


A_ID_KEYS, B_ID_KEYS = ("a_id", "left_id", "item_a"), ("b_id", "right_id", "item_b")
# The stock pairwise template holds the two texts (and the prompt), not ids.
A_TEXT_KEYS, B_TEXT_KEYS = ("a", "left", "answer1", "text1", "response_a"), ("b", "right", "answer2", "text2", "response_b")
PROMPT_KEYS = ("prompt", "question")


class CandidateTexts:
    """Candidates by (prompt, response text) hash: Label Studio pairwise tasks that show the two
    texts, not their ids, are matched to the candidates they show."""

    def __init__(self, candidates: pa.Table) -> None:
        self.ids = candidates.column("candidate_id").combine_chunks()
        self.prompt_ids = candidates.column("prompt_id").combine_chunks()
        self.known = set(self.ids.to_pylist())
        h = self._hash(candidates.column("prompt").to_pylist(), candidates.column("response").to_pylist())
        self.order = np.argsort(h)
        self.sorted = h[self.order]

    @staticmethod
    def _hash(prompts: list[Any], texts: list[Any]) -> np.ndarray:
        keys = [f"{'' if p is None else str(p).strip()}\x1f{'' if t is None else str(t).strip()}"
                for p, t in zip(prompts, texts, strict=True)]
        return hash64(pa.array(keys, pa.string()))

    def find(self, prompt: Any, text: Any) -> tuple[str, str] | None:
        """(candidate_id, prompt_id) of the candidate with this prompt and text, if any."""
        if not len(self.sorted):
            return None
        h = self._hash([prompt], [text])[0]
        at = int(np.searchsorted(self.sorted, h))
        if at < len(self.sorted) and self.sorted[at] == h:
            i = int(self.order[at])
            return self.ids[i].as_py(), self.prompt_ids[i].as_py()
        return None


def _first(data: dict[str, Any], keys: tuple[str, ...]) -> Any:
    return next((data.get(k) for k in keys if data.get(k) is not None), None)


def _pair_items(data: dict[str, Any], texts: CandidateTexts | None) -> tuple[str | None, str | None, Any, str | None]:
    """(a, b, prompt_id, reason) of a pairwise task: ids when the task holds them, else the
    candidates whose (prompt, text) the task shows; a reason when texts match no candidate."""
    a, b = _text(_first(data, A_ID_KEYS)), _text(_first(data, B_ID_KEYS))
    if a or b:
        return a, b, data.get("prompt_id"), None
    ta, tb = _first(data, A_TEXT_KEYS), _first(data, B_TEXT_KEYS)
    if ta is None or tb is None:
        return None, None, data.get("prompt_id"), None
    if texts is None or (_text(ta) in texts.known and _text(tb) in texts.known):
        return _text(ta), _text(tb), data.get("prompt_id"), None  # older exports: ids under a / b
    prompt = _first(data, PROMPT_KEYS)
    ma, mb = texts.find(prompt, ta), texts.find(prompt, tb)
    if ma is None or mb is None:
        return None, None, data.get("prompt_id"), "no candidate matches the texts"
    return ma[0], mb[0], data.get("prompt_id") or ma[1], None


def _ranker_records(value: dict[str, Any], to_name: Any, common: dict[str, Any]) -> list[dict[str, Any]]:
    """A Ranker result: one list is a ranking (best first); buckets are a ranking with ties,
    imported as pairwise labels (every item of an earlier bucket beats every item of a later
    one; items sharing a bucket tie). Items left in the source list (the key named like the
    result's `to_name`) were not ranked and are left out."""
    rk = value.get("ranker")
    if not isinstance(rk, dict):
        return [{**common, "kind": "ranking", "ranking": rk}]
    buckets = [(k, v) for k, v in rk.items() if not (k == to_name and len(rk) > 1)]
    if len(buckets) == 1:
        return [{**common, "kind": "ranking", "ranking": buckets[0][1]}]
    lists = [[_text(x) for x in (v if isinstance(v, list) else [])] for _, v in buckets]
    out = []
    for i, upper in enumerate(lists):
        for j in range(i, len(lists)):
            for x, y in (itertools.combinations(upper, 2) if i == j else itertools.product(upper, lists[j])):
                out.append({**common, "kind": "pairwise", "a": x, "b": y, "winner": "tie" if i == j else x})
    return out or [{**common, "kind": "ranking", "ranking": None}]


def _label_studio_rows(tasks: list[Any], texts: CandidateTexts | None = None) -> list[tuple[dict[str, Any] | None, str]]:
    """Flatten a Label Studio export: one record per (task, annotation, result) label (a Ranker
    with buckets gives one per implied pair). A record may carry `_reason`: a quarantine
    reason found while flattening."""
    out: list[tuple[dict[str, Any] | None, str]] = []
    for task in tasks:
        raw = json.dumps(task, ensure_ascii=False, sort_keys=True, default=str)
        if not isinstance(task, dict) or not isinstance(task.get("annotations", []), list):
            out.append((None, raw))
            continue
        data = task.get("data") or {}
        data = data if isinstance(data, dict) else {}
        a, b, prompt_id, unmatched = _pair_items(data, texts)
        item = _text(next((data.get(k) for k in ITEM_KEYS if data.get(k) is not None), None))
        base = {"prompt_id": prompt_id}
        for ann in task.get("annotations") or []:
            if not isinstance(ann, dict) or ann.get("was_cancelled"):
                continue
            who = ann.get("completed_by")
            common = {**base, "annotator": who, "ts": ann.get("created_at")}
            for res in ann.get("result") or []:
                value = res.get("value") if isinstance(res, dict) else None
                value = value if isinstance(value, dict) else {}
                typ = res.get("type") if isinstance(res, dict) else None
                rec: dict[str, Any] = dict(common)
                if typ == "pairwise" or (typ == "choices" and (a and b or unmatched)):
                    sel = value.get("selected")
                    if sel is None and value.get("choices"):
                        sel = value["choices"][0]
                    rec.update(kind="pairwise", a=a, b=b, winner=sel)
                    if unmatched:
                        rec["_reason"] = unmatched
                elif typ == "rating":
                    rec.update(kind="rating", item_id=item, rating=value.get("rating"))
                elif typ == "ranker":
                    label = json.dumps({"task": task.get("id"), "annotation": ann.get("id"), "result": res},
                                       ensure_ascii=False, sort_keys=True, default=str)
                    out += [(r, label) for r in _ranker_records(value, res.get("to_name"), common)]
                    continue
                elif typ == "number":
                    rec.update(kind="rating", item_id=item, rating=value.get("number"))
                else:
                    rec["kind"] = f"label-studio:{typ}"
                out.append((rec, json.dumps({"task": task.get("id"), "annotation": ann.get("id"), "result": res},
                                            ensure_ascii=False, sort_keys=True, default=str)))
    return out


def matches_candidate_texts(path: str | Path) -> bool:
    """Whether reading `path` may match tasks to candidates by text (a Label Studio JSON
    export): only then is `candidates` an input of its import, so that sampling new
    candidates does not re-import an unchanged JSONL / CSV file."""
    p = Path(path)
    if p.suffix.lower() != ".json":
        return False
    with open(p, "rb") as f:
        return f.read(4096).lstrip().startswith(b"[")


def read_annotations(path: str | Path, cfg: AnnotationsConfig | None = None,
                     texts: CandidateTexts | None = None) -> tuple[pa.Table, pa.Table, dict[str, Any]]:
    """(annotations rows, quarantine rows, report) from a JSONL / CSV / Label Studio JSON file;
    `texts` matches Label Studio pairwise tasks that hold texts instead of ids."""
    p = Path(path)
    if not p.is_file():
        raise AnnotationFormatError(f"{p} does not exist or is not a file")
    text = p.read_text(encoding="utf-8", errors="replace")
    records: list[tuple[dict[str, Any] | None, str]] = []
    fmt = p.suffix.lower()
    if fmt == ".csv":
        for r in csv.DictReader(text.splitlines()):
            clean = {k: (v if v != "" else None) for k, v in r.items() if k is not None}
            records.append((clean, json.dumps(clean, ensure_ascii=False, sort_keys=True)))
    elif fmt == ".json" and text.lstrip().startswith("["):
        try:
            tasks = json.loads(text)
        except (ValueError, RecursionError) as exc:
            raise AnnotationFormatError(f"{p}: not valid JSON: {exc}") from exc
        records = _label_studio_rows(tasks, texts)
        fmt = "label-studio"
    elif fmt in (".jsonl", ".ndjson", ".json"):
        for line in text.splitlines():
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError:
                records.append((None, line))
                continue
            records.append((obj if isinstance(obj, dict) else None, line))
    else:
        raise AnnotationFormatError(f"{p}: unknown format {p.suffix!r} (use .jsonl, .csv or a Label Studio .json export)")
    good: dict[str, dict[str, Any]] = {}
    bad: list[tuple[str, str, int]] = []
    for i, (rec, raw) in enumerate(records):
        if rec is None:
            bad.append(("invalid JSON" if fmt != "label-studio" else "invalid Label Studio task", raw, i))
            continue
        row, why = (None, rec["_reason"]) if rec.get("_reason") else normalise_row(rec, cfg)
        if row is None:
            bad.append((why or "invalid", raw, i))
        else:
            good[row["annotation_id"]] = row  # the same annotator labelling the same items again: last wins
    now = dt.datetime.now(dt.UTC)
    table = pa.Table.from_pylist(list(good.values()), schema=ANNOTATIONS)
    q = pa.table({
        "source": [str(p)] * len(bad), "stage": ["import"] * len(bad), "dataset": ["annotations"] * len(bad),
        "reason": [b[0] for b in bad], "raw": [b[1] for b in bad], "row_index": pa.array([b[2] for b in bad], pa.int64()),
        "quarantined_at": pa.array([now] * len(bad), TS),
    }, schema=QUARANTINE)
    report = {"format": fmt.lstrip("."), "rows_in": len(records), "rows_out": table.num_rows,
              "duplicates_replaced": len(records) - len(bad) - table.num_rows,
              "quarantined": dict(Counter(b[0] for b in bad))}
    return table, q, report


# --- aggregation ----------------------------------------------------------------------------

def bradley_terry(items: list[str], wins: dict[tuple[str, str], float], prior: float = 0.5,
                  iterations: int = 200, tol: float = 1e-9) -> dict[str, float]:
    """Bradley-Terry strengths (geometric mean 1) by the MM algorithm.

    P(i beats j) = s_i / (s_i + s_j). Update: s_i = W_i / sum_j n_ij / (s_i + s_j), where W_i are
    i's wins and n_ij the games between i and j (ties count half a win each). `prior` adds that
    many games of every item against a virtual item of strength 1, won half the time. That
    virtual item fixes the scale, so with a prior the strengths are not renormalised each step
    (that would move the fixed point away from the regularised fit). Instead each MM step is
    followed by the exact best common rescaling, which the likelihood gives in closed form as
    sum_i s_i / (s_i + 1) = m / 2 (solved by Newton in log scale): MM alone creeps along that
    direction very slowly. The result is rescaled to geometric mean 1, which keeps every s_i / s_j."""
    idx = {it: k for k, it in enumerate(items)}
    m = len(items)
    W = np.zeros((m, m))
    for (i, j), w in wins.items():
        W[idx[i], idx[j]] += w
    N = W + W.T
    s = np.ones(m)
    for _ in range(iterations):
        denom = (N / (s[:, None] + s[None, :])).sum(axis=1) + prior / (s + 1.0)
        new = (W.sum(axis=1) + prior / 2) / np.maximum(denom, 1e-300)
        new = np.where(new > 0, new, 1e-12)
        if prior <= 0:  # without the anchor the likelihood is scale-free: pin the scale
            new /= math.exp(np.log(new).mean())
        else:  # best common scale against the virtual item (each step raises the likelihood)
            u, ls = 0.0, np.log(new)
            for _ in range(50):
                with np.errstate(over="ignore"):
                    q = 1.0 / (1.0 + np.exp(-(ls + u)))
                step = float(np.clip((q.sum() - m / 2) / max((q * (1 - q)).sum(), 1e-12), -4, 4))
                u -= step
                if abs(step) < 1e-13:
                    break
            new = new * math.exp(u)
        if np.max(np.abs(new - s) / np.maximum(s, 1e-300)) < tol:
            s = new
            break
        s = new
    s = s / math.exp(np.log(s).mean())
    return {it: float(s[idx[it]]) for it in items}


def _kendall_tau(order: list[str], consensus: list[str]) -> float:
    pos = {it: k for k, it in enumerate(consensus)}
    common = [it for it in order if it in pos]
    conc = disc = 0
    for x, y in itertools.combinations(common, 2):
        if pos[x] < pos[y]:
            conc += 1
        else:
            disc += 1
    return (conc - disc) / (conc + disc) if conc + disc else 1.0


def fleiss_kappa(counts: list[list[int]]) -> float | None:
    """Fleiss' kappa over items with the same number (>= 2) of raters; rows = category counts."""
    if not counts:
        return None
    by_n: dict[int, list[list[int]]] = defaultdict(list)
    for c in counts:
        if sum(c) >= 2:
            by_n[sum(c)].append(c)
    if not by_n:
        return None
    n, rows = max(by_n.items(), key=lambda kv: len(kv[1]))
    M = np.array(rows, float)
    p_j = M.sum(axis=0) / M.sum()
    P_i = ((M * M).sum(axis=1) - n) / (n * (n - 1))
    Pbar, Pe = P_i.mean(), (p_j ** 2).sum()
    return float((Pbar - Pe) / (1 - Pe)) if Pe < 1 else 1.0


def _judgement(kind: str, prompt_id: str | None, items: list[str], annotators: list[str], **kw: Any) -> dict[str, Any]:
    # the id names the item set, not the consensus order, so it survives a re-ranking
    return {"judgement_id": stable_id_one(kind, prompt_id, "\x1e".join(sorted(items)), prefix="j-"), "kind": kind,
            "prompt_id": prompt_id, "item_ids": items, "winner": kw.get("winner"), "ranks": kw.get("ranks"),
            "rating": kw.get("rating"), "strength": kw.get("strength"), "n_annotators": len(set(annotators)),
            "agreement": kw.get("agreement"), "annotators": sorted(set(annotators))}


def aggregate(table: pa.Table, cfg: AnnotationsConfig | None = None) -> tuple[pa.Table, dict[str, Any]]:
    """`annotations` rows -> (`judgements`, stats with agreement and per-annotator reliability)."""
    cfg = cfg or AnnotationsConfig()
    rows = table.to_pylist()
    out: list[dict[str, Any]] = []
    rel: dict[str, list[float]] = defaultdict(list)
    # pairwise: majority per unordered pair
    pairs: dict[tuple[Any, str, str], list[dict]] = defaultdict(list)
    for r in (r for r in rows if r["kind"] == "pairwise"):
        a, b = sorted(r["item_ids"])
        pairs[(r["prompt_id"], a, b)].append(r)
    kappa_counts, pair_agree = [], []
    for (pid, a, b), labels in sorted(pairs.items(), key=lambda kv: (str(kv[0][0]), kv[0][1], kv[0][2])):
        c = Counter(r["winner"] for r in labels)
        na, nb, nt = c.get(a, 0), c.get(b, 0), c.get("tie", 0)
        top = max(na, nb, nt)
        winner = "tie" if (nt == top or na == nb) else (a if na > nb else b)
        agree = c.get(winner, 0) / len(labels)
        kappa_counts.append([na, nb, nt])
        pair_agree.append(agree)
        if len(labels) >= 2:
            for r in labels:
                rel[r["annotator"]].append(float(r["winner"] == winner))
        out.append(_judgement("pairwise", pid, [a, b], [r["annotator"] for r in labels], winner=winner,
                              strength=top / len(labels), agreement=agree))
    # Bradley-Terry: rankings per prompt (or item set), plus prompts with many pairwise items
    groups: dict[Any, list[dict]] = defaultdict(list)
    for r in rows:
        if r["kind"] == "ranking":
            groups[r["prompt_id"] or ("items", tuple(sorted(r["item_ids"])))].append(r)
    by_prompt: dict[Any, list[dict]] = defaultdict(list)
    for r in rows:
        if r["kind"] == "pairwise" and r["prompt_id"]:
            by_prompt[r["prompt_id"]].append(r)
    for pid, labels in by_prompt.items():
        if len({i for r in labels for i in r["item_ids"]}) >= cfg.bt_min_items:
            groups[pid].extend(labels)
    rank_tau = []
    for key, labels in sorted(groups.items(), key=lambda kv: str(kv[0])):
        items = sorted({i for r in labels for i in r["item_ids"]})
        wins: dict[tuple[str, str], float] = defaultdict(float)
        for r in labels:
            if r["kind"] == "ranking":
                for x, y in itertools.combinations(r["item_ids"], 2):
                    wins[(x, y)] += 1
            elif r["winner"] == "tie":
                a, b = r["item_ids"]
                wins[(a, b)] += 0.5
                wins[(b, a)] += 0.5
            else:
                loser = next(i for i in r["item_ids"] if i != r["winner"])
                wins[(r["winner"], loser)] += 1
        s = bradley_terry(items, wins, cfg.bt_prior, cfg.bt_iterations)
        order = sorted(items, key=lambda i: (-s[i], i))
        taus = []
        for r in labels:
            if r["kind"] == "ranking":
                t = _kendall_tau(r["item_ids"], order)
                taus.append(t)
                if len(labels) >= 2:
                    rel[r["annotator"]].append((t + 1) / 2)
        agreement = float(np.mean([(t + 1) / 2 for t in taus])) if taus else None
        rank_tau += taus
        top2 = order[:2]
        pid = key if isinstance(key, str) else None
        out.append(_judgement("ranking", pid, order, [r["annotator"] for r in labels],
                              ranks=list(range(1, len(order) + 1)), winner=order[0],
                              strength=s[top2[0]] / (s[top2[0]] + s[top2[1]]), agreement=agreement))
    # ratings: mean per item
    ratings: dict[tuple[Any, str], list[dict]] = defaultdict(list)
    for r in (r for r in rows if r["kind"] == "rating"):
        ratings[(r["prompt_id"], r["item_ids"][0])].append(r)
    half = max((cfg.rating_max - cfg.rating_min) / 2, 1e-9)
    rating_agree = []
    for (pid, item), labels in sorted(ratings.items(), key=lambda kv: (str(kv[0][0]), kv[0][1])):
        vals = np.array([r["rating"] for r in labels], float)
        mean = float(vals.mean())
        agree = float(max(0.0, 1 - np.abs(vals - mean).mean() / half))
        rating_agree.append(agree)
        if len(labels) >= 2:
            for r in labels:
                rel[r["annotator"]].append(max(0.0, 1 - abs(r["rating"] - mean) / half))
        out.append(_judgement("rating", pid, [item], [r["annotator"] for r in labels], rating=mean,
                              strength=float(vals.std()), agreement=agree))
    judgements = pa.Table.from_pylist(out, schema=JUDGEMENTS)
    stats = {
        "judgements": dict(Counter(j["kind"] for j in out)),
        "pairwise_mean_agreement": float(np.mean(pair_agree)) if pair_agree else None,
        "pairwise_fleiss_kappa": fleiss_kappa(kappa_counts),
        "ranking_mean_kendall_tau": float(np.mean(rank_tau)) if rank_tau else None,
        "rating_mean_agreement": float(np.mean(rating_agree)) if rating_agree else None,
        "annotators": {a: {"labels": sum(1 for r in rows if r["annotator"] == a),
                           "scored": len(v), "reliability": float(np.mean(v)) if v else None}
                       for a, v in rel.items()},
    }
    for a in {r["annotator"] for r in rows} - set(stats["annotators"]):
        stats["annotators"][a] = {"labels": sum(1 for r in rows if r["annotator"] == a), "scored": 0, "reliability": None}
    all_agree = [x for x in (pair_agree + rating_agree) if x is not None]
    stats["agreement"] = float(np.mean(all_agree)) if all_agree else None
    return judgements, stats


# --- stages ---------------------------------------------------------------------------------

def import_stage(ctx: StageContext) -> StageResult:
    """`dpoflow import annotations FILE`: the file's labels added to the previous `annotations`
    version (the same annotator's later label of the same items wins). Config: ``file`` and
    ``annotations`` (the AnnotationsConfig the file is read with). A bad row seen by an earlier
    import is not quarantined again."""
    path = Path(ctx.config["file"])
    texts = CandidateTexts(ctx.read("candidates", ["candidate_id", "prompt_id", "prompt", "response"])) \
        if ctx.has("candidates") else None
    new, quarantine, report = read_annotations(path, AnnotationsConfig.model_validate(ctx.config["annotations"]), texts)
    quarantine = unseen_quarantine(ctx.store, quarantine)
    table = new
    if ctx.has("annotations"):
        prev = ctx.read("annotations")
        keep = pc.invert(pc.is_in(prev.column("annotation_id"), value_set=new.column("annotation_id")))
        table = pa.concat_tables([prev.filter(keep), new])
    return StageResult(outputs={"annotations": table}, quarantine=quarantine, report=report,
                       metadata={"annotations": {"file": str(path)}})


def aggregate_stage(ctx: StageContext) -> StageResult:
    """annotations@V -> judgements (majority / mean / Bradley-Terry with agreement stats); the
    per-annotator reliability goes into the version's metadata."""
    judgements, stats = aggregate(ctx.read("annotations"), ctx.config)
    report = {k: v for k, v in stats.items() if k != "annotators"}
    report["annotators"] = len(stats["annotators"])
    return StageResult(outputs={"judgements": judgements}, report=report,
                       metadata={"judgements": {"agreement": stats.get("agreement"),
                                                "annotators": stats["annotators"]}})


def reliability_rows(annotators: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One report row per annotator (the `annotator-reliability` table)."""
    return [{"annotator": a, **v} for a, v in sorted(annotators.items())]
