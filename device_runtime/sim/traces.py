"""Trace loaders: per-query quality of a weak (device) and a strong (edge) model.

The paper evaluates by simulation over recorded per-query model quality
(Sec. IV).  These loaders read RouteLLM's evaluation files (lm-sys/RouteLLM,
``routellm/evals/``) from a directory laid out like::

    DIR/mmlu/mmlu_<domain>.csv          prompt,<weak>,<strong>         (True/False)
    DIR/mmlu/contaminated_prompts.jsonl
    DIR/gsm8k/gsm8k_responses.csv       prompt,<weak>,<strong>,<weak>_response,<strong>_response
    DIR/gsm8k/contaminated_prompts.jsonl
    DIR/mt_bench/question.jsonl         {"question_id", "category", "turns": [t1, t2]}
    DIR/mt_bench/judgements.jsonl       {"question_id", "model", "judge", "user_prompt", "score", "turn", ...}
    DIR/mt_bench/contaminated_prompts.jsonl

Weak = device SLM, strong = edge LLM.  The model columns are detected, not
hard-coded: the strong one is the column naming ``gpt-4``.

MT-Bench turn-2 context: the data does not carry the dialogue as the device
saw it, but each judgement's ``user_prompt`` embeds the judged model's answer.
Turn 2's context is ``[user turn 1, assistant: the weak model's turn-1 answer]``,
taken from the weak model's turn-1 judgement (the device answers first by
default).  When that answer cannot be recovered, the context is the user turn
alone.  This is documented in docs/simulation.md.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import re
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Literal

from device_runtime.routing.routers.base import Message

log = logging.getLogger(__name__)

BENCHMARKS: tuple[str, ...] = ("mmlu", "gsm8k", "mt-bench")
#: Benchmark name -> sub-directory of the data directory.
SUBDIRS: dict[str, str] = {"mmlu": "mmlu", "gsm8k": "gsm8k", "mt-bench": "mt_bench"}
CONTAMINATED_FILE = "contaminated_prompts.jsonl"
RESPONSE_SUFFIX = "_response"


class TraceError(ValueError):
    """A trace directory or file is missing or malformed."""


@dataclass(frozen=True)
class TraceTurn:
    """One routed query: the prompt, what came before, and both models' quality."""

    prompt: str
    #: Earlier turns as messages; () for a single-turn query.
    context: tuple[Message, ...]
    #: Weak (device) model: 1.0/0.0 correctness, or a 1-10 judge score (MT-Bench).
    quality_device: float
    #: Strong (edge) model, same scale.
    quality_edge: float
    #: Per-query response length in words, when the data has the response.
    response_words_device: int | None = None
    response_words_edge: int | None = None


@dataclass(frozen=True)
class Dialogue:
    id: str
    #: MMLU subject, "gsm8k", or the MT-Bench category.
    domain: str
    turns: tuple[TraceTurn, ...]


def word_count(text: str) -> int:
    """Token count as the paper counts it: words split on whitespace."""
    return len(text.split())


def split_of(prompt: str, val_fraction: float = 0.2) -> Literal["train", "val"]:
    """Deterministic train/validation split by a hash of the prompt.

    Hashing the prompt (not the row index) keeps a prompt in the same split
    whichever file or order it comes from.
    """
    if not 0.0 <= val_fraction <= 1.0:
        raise ValueError(f"val_fraction must be in [0, 1], got {val_fraction!r}")
    bucket = int(hashlib.sha256(prompt.encode()).hexdigest()[:8], 16) % 10_000
    return "val" if bucket < val_fraction * 10_000 else "train"


def load_trace(
    benchmark: str,
    data_dir: str | Path,
    *,
    decontaminate: bool = True,
    weak: str | None = None,
    strong: str | None = None,
) -> list[Dialogue]:
    """Load one benchmark's trace from ``data_dir`` (laid out like RouteLLM's evals).

    ``weak``/``strong`` name the model columns (or MT-Bench model names) when
    auto-detection does not fit.  Raises :class:`TraceError` on missing or
    malformed files.
    """
    if benchmark not in BENCHMARKS:
        raise TraceError(f"unknown benchmark {benchmark!r}; expected one of {', '.join(BENCHMARKS)}")
    root = Path(data_dir)
    if not root.is_dir():
        raise TraceError(f"data directory {str(root)!r} does not exist or is not a directory")
    sub = root / SUBDIRS[benchmark]
    if not sub.is_dir():
        raise TraceError(
            f"{benchmark}: expected sub-directory {str(sub)!r} (data dir laid out like RouteLLM's routellm/evals/)"
        )
    contaminated = _contaminated_prompts(sub) if decontaminate else frozenset()
    if benchmark == "mmlu":
        return _load_mmlu(sub, contaminated, weak, strong)
    if benchmark == "gsm8k":
        return _load_gsm8k(sub, contaminated, weak, strong)
    return _load_mt_bench(sub, contaminated, weak, strong)


# --- helpers ----------------------------------------------------------------


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    try:
        with path.open(encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise TraceError(f"{path}:{lineno}: invalid JSON ({exc.msg})") from None
                if not isinstance(row, dict):
                    raise TraceError(f"{path}:{lineno}: expected a JSON object per line")
                rows.append(row)
    except FileNotFoundError:
        raise TraceError(f"missing file {str(path)!r}") from None
    return rows


def _contaminated_prompts(sub: Path) -> frozenset[str]:
    path = sub / CONTAMINATED_FILE
    if not path.exists():
        # A directory without the file is still usable; say so rather than fail.
        log.warning("%s not found: no decontamination for %s", path, sub.name)
        return frozenset()
    prompts = set()
    for i, row in enumerate(_read_jsonl(path), 1):
        if "eval_prompt" not in row:
            raise TraceError(f"{path}: line {i} has no 'eval_prompt'")
        prompts.add(row["eval_prompt"])
    return frozenset(prompts)


def _read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    # Long MMLU passages can exceed csv's default field limit.
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    try:
        with path.open(encoding="utf-8", newline="") as fh:
            reader = csv.DictReader(fh)
            header = list(reader.fieldnames or [])
            rows = list(reader)
    except FileNotFoundError:
        raise TraceError(f"missing file {str(path)!r}") from None
    except csv.Error as exc:
        raise TraceError(f"{path}: malformed CSV ({exc})") from None
    if "prompt" not in header:
        raise TraceError(f"{path}: no 'prompt' column (columns: {header})")
    return header, rows


def _is_strong_name(name: str) -> bool:
    return "gpt-4" in name.lower()


def _pick_pair(
    candidates: Iterable[str], where: str, weak: str | None, strong: str | None
) -> tuple[str, str]:
    """Decide which of the model names is the weak and which the strong one."""
    names = list(dict.fromkeys(candidates))
    for given in (weak, strong):
        if given is not None and given not in names:
            raise TraceError(f"{where}: model {given!r} not present (found {names})")
    if weak is not None and strong is not None:
        return weak, strong
    if strong is None:
        strongs = [n for n in names if n != weak and _is_strong_name(n)]
        if len(strongs) > 1 and "gpt-4-1106-preview" in strongs:
            strongs = ["gpt-4-1106-preview"]
        if len(strongs) != 1:
            raise TraceError(
                f"{where}: cannot tell the strong (edge) model: expected exactly one name "
                f"containing 'gpt-4' among {names}; pass strong=..."
            )
        strong = strongs[0]
    if weak is None:
        weaks = [n for n in names if n != strong]
        if len(weaks) > 1:
            weaks = [n for n in weaks if "mixtral" in n.lower()] or weaks
        if len(weaks) != 1:
            raise TraceError(
                f"{where}: cannot tell the weak (device) model among {names}; pass weak=..."
            )
        weak = weaks[0]
    return weak, strong


def _model_columns(header: list[str], path: Path, weak: str | None, strong: str | None) -> tuple[str, str]:
    candidates = [c for c in header if c != "prompt" and not c.endswith(RESPONSE_SUFFIX)]
    if len(candidates) < 2:
        raise TraceError(
            f"{path}: expected a weak and a strong correctness column besides 'prompt', found {header}"
        )
    return _pick_pair(candidates, str(path), weak, strong)


_TRUE = {"true", "1", "1.0"}
_FALSE = {"false", "0", "0.0"}


def _as_correct(value: str | None, path: Path, row: int, column: str) -> float:
    v = (value or "").strip().lower()
    if v in _TRUE:
        return 1.0
    if v in _FALSE:
        return 0.0
    raise TraceError(f"{path}: row {row}, column {column!r}: expected True/False, got {value!r}")


# --- MMLU / GSM8K -------------------------------------------------------------


def _load_mmlu(sub: Path, contaminated: frozenset[str], weak, strong) -> list[Dialogue]:
    files = sorted(sub.glob("mmlu_*.csv"))
    if not files:
        raise TraceError(f"no mmlu_<domain>.csv files in {str(sub)!r}")
    dialogues: list[Dialogue] = []
    for path in files:
        domain = path.stem[len("mmlu_"):]
        header, rows = _read_csv(path)
        w, s = _model_columns(header, path, weak, strong)
        for i, row in enumerate(rows):
            turn = _correctness_turn(row, path, i, w, s, contaminated)
            if turn is not None:
                dialogues.append(Dialogue(f"mmlu/{domain}/{i}", domain, (turn,)))
    return dialogues


def _correctness_turn(
    row: dict, path: Path, i: int, w: str, s: str, contaminated: frozenset[str], **lengths
) -> TraceTurn | None:
    """The single turn of one correctness-CSV row (MMLU, GSM8K); None if it is dropped."""
    prompt = row["prompt"]
    if prompt is None or prompt in contaminated:
        return None
    return TraceTurn(
        prompt=prompt,
        context=(),
        quality_device=_as_correct(row.get(w), path, i, w),
        quality_edge=_as_correct(row.get(s), path, i, s),
        **lengths,
    )


def _load_gsm8k(sub: Path, contaminated: frozenset[str], weak, strong) -> list[Dialogue]:
    path = sub / "gsm8k_responses.csv"
    header, rows = _read_csv(path)
    w, s = _model_columns(header, path, weak, strong)
    w_resp, s_resp = w + RESPONSE_SUFFIX, s + RESPONSE_SUFFIX
    has_resp = w_resp in header and s_resp in header
    if not has_resp:
        log.warning("%s: no %r/%r columns; per-query response lengths unavailable", path, w_resp, s_resp)
    dialogues: list[Dialogue] = []
    for i, row in enumerate(rows):
        turn = _correctness_turn(
            row, path, i, w, s, contaminated,
            response_words_device=word_count(row.get(w_resp) or "") if has_resp else None,
            response_words_edge=word_count(row.get(s_resp) or "") if has_resp else None,
        )
        if turn is not None:
            dialogues.append(Dialogue(f"gsm8k/{i}", "gsm8k", (turn,)))
    return dialogues


# --- MT-Bench -----------------------------------------------------------------

_SINGLE_ANSWER = re.compile(
    r"\[The Start of Assistant's Answer\]\n(.*?)\n\[The End of Assistant's Answer\]", re.S
)
_CONV_FIRST_ANSWER = re.compile(
    r"<\|The Start of Assistant A's Conversation with User\|>.*?### Assistant A:\n(.*?)\n\n### User:",
    re.S,
)


def _turn1_answer(user_prompts: list[str]) -> str | None:
    """The judged model's turn-1 answer, recovered from a judge prompt."""
    for text in user_prompts:
        m = _SINGLE_ANSWER.search(text) or _CONV_FIRST_ANSWER.search(text)
        if m and m.group(1).strip():
            return m.group(1).strip()
    return None


def _score(value) -> float | None:
    try:
        score = float(value)
    except (TypeError, ValueError):
        return None
    # MT-Bench writes -1 when the judge's rating could not be parsed.
    if math.isnan(score) or score < 0:
        return None
    return score


def _load_mt_bench(sub: Path, contaminated: frozenset[str], weak, strong) -> list[Dialogue]:
    qpath, jpath = sub / "question.jsonl", sub / "judgements.jsonl"
    questions = _read_jsonl(qpath)
    judgements = _read_jsonl(jpath)
    for i, j in enumerate(judgements, 1):
        # A row without a score is skipped below, like a -1; these identify the row.
        missing = {"question_id", "model", "turn"} - set(j)
        if missing:
            raise TraceError(f"{jpath}: line {i} lacks {sorted(missing)}")
    w, s = _pick_pair((str(j["model"]) for j in judgements), str(jpath), weak, strong)

    # (question_id, model, turn) -> scores; several judgements are averaged, as RouteLLM does.
    scores: dict[tuple, list[float]] = defaultdict(list)
    prompts_t1: dict[tuple, list[str]] = defaultdict(list)
    for j in judgements:
        try:
            turn = int(j["turn"])
        except (TypeError, ValueError):
            raise TraceError(f"{jpath}: 'turn' must be an integer, got {j['turn']!r}") from None
        key = (j["question_id"], str(j["model"]), turn)
        score = _score(j.get("score"))
        if score is not None:
            scores[key].append(score)
        if isinstance(j.get("user_prompt"), str):
            prompts_t1[(j["question_id"], str(j["model"]))].append(j["user_prompt"])

    def mean_score(qid, model, turn) -> float | None:
        vals = scores.get((qid, model, turn))
        return sum(vals) / len(vals) if vals else None

    dialogues: list[Dialogue] = []
    for i, q in enumerate(questions, 1):
        if "question_id" not in q or not isinstance(q.get("turns"), list) or not q["turns"]:
            raise TraceError(f"{qpath}: line {i} needs 'question_id' and a non-empty 'turns' list")
        qid, user_turns = q["question_id"], [str(t) for t in q["turns"]]
        if contaminated and any(t in contaminated for t in user_turns):
            continue  # RouteLLM drops the question if either turn is contaminated
        turns: list[TraceTurn] = []
        context: list[Message] = []
        for t, prompt in enumerate(user_turns, 1):
            qd, qe = mean_score(qid, w, t), mean_score(qid, s, t)
            if qd is None or qe is None:
                break  # a later turn needs this one as context: keep the scored prefix
            turns.append(TraceTurn(prompt, tuple(context), qd, qe))
            context.append({"role": "user", "content": prompt})
            if t == 1:
                answer = _turn1_answer(prompts_t1.get((qid, w), []))
                if answer is not None:
                    context.append({"role": "assistant", "content": answer})
                else:
                    log.debug("mt-bench question %s: weak turn-1 answer not found", qid)
        if not turns:
            log.debug("mt-bench question %s: no usable scores, skipped", qid)
            continue
        dialogues.append(Dialogue(f"mt-bench/{qid}", str(q.get("category", "mt-bench")), tuple(turns)))
    if not dialogues:
        raise TraceError(f"{sub}: no MT-Bench question has scores for both {w!r} and {s!r}")
    return dialogues
