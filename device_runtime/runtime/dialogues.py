"""Script and dialogue files replayed by ``edgeroute chat --script`` and ``edgeroute demo``.

One JSON object per line (blank lines are skipped):

- ``{"prompt": str}``: one user turn, continuing the current conversation;
- ``{"history": [{"user": str, ...}, ...]}`` (MT-Bench-101's format, other
  keys such as ``bot``, ``task``, ``id`` are ignored): a dialogue, which starts
  a new conversation and plays its ``user`` turns in order.

:func:`sample_texts` and :func:`sample_prompts` read MT-Bench-101's file for
``edgeroute profile`` (real text to measure on), falling back to the demo
dialogues; they live here, with the format, because the profiler itself sits
in the link layer, below this one.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Iterable

DEMO_DIALOGUES = "demo_dialogues.jsonl"
#: MT-Bench-101 under the shared data directory.
MTBENCH101 = Path("mtbench101") / "mtbench101.jsonl"

log = logging.getLogger(__name__)


class ScriptError(ValueError):
    """A script line is malformed; the message names the file and line."""


@dataclass(frozen=True)
class ScriptItem:
    """Turns to play; ``new_conversation`` for a dialogue line."""

    prompts: tuple[str, ...]
    new_conversation: bool
    #: Where it came from ("file:line", plus the dialogue's task/id when given).
    source: str


def parse_script(lines: Iterable[str], name: str = "<script>", *, dialogues_only: bool = False) -> list[ScriptItem]:
    items: list[ScriptItem] = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{name}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ScriptError(f"{where}: not valid JSON ({exc.msg})") from None
        if not isinstance(obj, dict):
            raise ScriptError(f"{where}: expected a JSON object")
        has_prompt, has_history = "prompt" in obj, "history" in obj
        if has_prompt == has_history:
            raise ScriptError(f"{where}: expected exactly one of 'prompt' or 'history'")
        if has_prompt:
            if dialogues_only:
                raise ScriptError(f"{where}: expected an MT-Bench-101 dialogue {{'history': [...]}}")
            prompt = obj["prompt"]
            if not isinstance(prompt, str) or not prompt.strip():
                raise ScriptError(f"{where}: 'prompt' must be a non-empty string")
            items.append(ScriptItem((prompt,), False, where))
            continue
        history = obj["history"]
        if not isinstance(history, list) or not history:
            raise ScriptError(f"{where}: 'history' must be a non-empty list")
        prompts = []
        for i, turn in enumerate(history):
            if not isinstance(turn, dict) or not isinstance(turn.get("user"), str) or not turn["user"].strip():
                raise ScriptError(f"{where}: history[{i}] needs a non-empty string 'user'")
            prompts.append(turn["user"])
        label = ""
        if "task" in obj or "id" in obj:
            label = f" ({obj.get('task', '?')} #{obj.get('id', '?')})"
        items.append(ScriptItem(tuple(prompts), True, where + label))
    return items


def load_script(path: str | Path, *, dialogues_only: bool = False) -> list[ScriptItem]:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8-sig")  # a leading BOM is not part of the JSON
    except OSError as exc:
        raise ScriptError(f"cannot read {p}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ScriptError(f"{p}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    # Lines end at "\n" only: str.splitlines() would also split at U+2028,
    # U+2029 and U+0085, which JSON allows raw inside strings.
    lines = [line.removesuffix("\r") for line in text.split("\n")]
    if lines and lines[-1] == "":
        lines.pop()
    items = parse_script(lines, str(p), dialogues_only=dialogues_only)
    if not items:
        raise ScriptError(f"{p}: no turns to play")
    return items


def default_dialogues_path() -> Path:
    """The team-written dialogues shipped with the package."""
    return Path(str(resources.files("device_runtime").joinpath("data", DEMO_DIALOGUES)))


def load_dialogues(path: str | Path | None = None, *, limit: int | None = None,
                   max_turns: int | None = None) -> list[ScriptItem]:
    """MT-Bench-101-format dialogues: the first ``limit``, each cut to ``max_turns``."""
    items = load_script(path or default_dialogues_path(), dialogues_only=True)
    if limit is not None:
        items = items[:limit]
    if max_turns is not None:
        items = [ScriptItem(i.prompts[:max_turns], True, i.source) for i in items]
    return items


def sample_texts(data_dir: Path | None, limit: int = 400) -> list[str]:
    """Real text: MT-Bench-101 turns (user and reference answers) if ``data_dir``
    has them, else the team-written demo dialogues shipped with the package."""
    texts: list[str] = []
    path = data_dir / MTBENCH101 if data_dir else None
    if path is not None and path.is_file():
        with path.open(encoding="utf-8") as f:
            for line in f:
                for turn in json.loads(line).get("history", []):
                    texts += [t for t in (turn.get("user"), turn.get("bot")) if t]
                if len(texts) >= limit:
                    break
        return texts[:limit]
    if data_dir is not None:
        log.warning("%s not found; using the package's demo dialogues for text", path)
    for item in load_dialogues():
        texts += list(item.prompts)
    return texts


def sample_prompts(data_dir: Path | None, n: int) -> list[str]:
    """``n`` real user prompts for answer lengths: the first user turn of ``n``
    MT-Bench-101 dialogues spread over the file, at a quarter-step offset (so
    not the evenly spread dialogues that ``scripts/bench_link.py`` replays),
    else the demo dialogues' prompts."""
    if n <= 0:
        return []
    path = data_dir / MTBENCH101 if data_dir else None
    if path is not None and path.is_file():
        with path.open(encoding="utf-8") as f:
            firsts = [next((t["user"] for t in json.loads(line).get("history", []) if t.get("user")), None)
                      for line in f if line.strip()]
        firsts = [t for t in firsts if t]
        if firsts:
            step = len(firsts) / n
            return [firsts[min(len(firsts) - 1, int((k + 0.25) * step))] for k in range(n)]
    prompts = [p for item in load_dialogues() for p in item.prompts]
    return prompts[:n]
