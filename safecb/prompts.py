"""Prompt sources: text files, JSONL files, or built-in sets. Bad input fails with one line.

`.txt`: one prompt per line (blank lines skipped); `.jsonl`: one object per line with "text" (and
optionally "id"). Prompt ids are stable: the given id, else `<source name>:<line number>`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safecb.config import PromptSource


class PromptError(ValueError):
    """An unreadable or empty prompt source. One line naming the file and what was expected."""


@dataclass(frozen=True)
class Prompt:
    prompt_id: str
    text: str
    meta: Any = field(default=None, compare=False)  # e.g. the world's PromptRecord with exact labels


def load_prompts(source: PromptSource, key: str) -> list[Prompt]:
    """The prompts of one source; `key` is the config path for messages (e.g. "prompts.train")."""
    if source.builtin is not None:
        prompts = _builtin(source.builtin, key)
    else:
        prompts = _from_file(source.path or "", key)
    if source.limit is not None:
        prompts = prompts[: source.limit]
    if not prompts:
        where = source.path or source.builtin
        raise PromptError(f"{key}: {where}: no prompts (expected at least one non-empty line)")
    return prompts


def _builtin(name: str, key: str) -> list[Prompt]:
    if name.startswith("world:"):
        from safecb.world.prompts import builtin_prompts

        try:
            records = builtin_prompts(name)
        except ValueError as err:
            raise PromptError(f"{key}.builtin: {err}") from None
        return [Prompt(r.prompt_id, r.text, r) for r in records]
    raise PromptError(f"{key}.builtin: unknown built-in set {name!r} (expected 'world:train', 'world:eval_unsafe' or 'world:eval_benign')")


def _from_file(path: str, key: str) -> list[Prompt]:
    file = Path(path)
    try:
        raw = file.read_bytes()
    except FileNotFoundError:
        raise PromptError(f"{key}.path: {path}: prompt file not found") from None
    except OSError as err:
        raise PromptError(f"{key}.path: {path}: cannot read ({err.strerror})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise PromptError(f"{key}.path: {path}: not UTF-8 text (bad byte at offset {err.start})") from None
    stem = file.stem
    prompts: list[Prompt] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        if file.suffix == ".jsonl":
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                raise PromptError(f"{key}.path: {path}:{number}: not a JSON object") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str) or not obj["text"].strip():
                raise PromptError(f"{key}.path: {path}:{number}: expected an object with a non-empty string 'text'")
            prompts.append(Prompt(str(obj.get("id", f"{stem}:{number}")), obj["text"].strip()))
        else:
            prompts.append(Prompt(f"{stem}:{number}", line.strip()))
    ids = [p.prompt_id for p in prompts]
    if len(set(ids)) != len(ids):
        raise PromptError(f"{key}.path: {path}: duplicate prompt ids")
    return prompts
