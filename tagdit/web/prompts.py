"""The sampling page's tag prompts: completion from the vocabulary, and the checks a prompt must pass
(known tags, at most the model's number of tags), each refusal naming the field as the page labels it."""

from __future__ import annotations

import difflib
from typing import Any

from tagdit.data.vocab import normalize_tag
from tagdit.web.forms import LABELS, GenerateForm


def complete(tags: list[str], prefix: str, limit: int) -> list[str]:
    """Tags starting with `prefix` (as typed or normalised), then tags containing it elsewhere."""
    queries = {prefix.strip().lower(), normalize_tag(prefix)}
    starts = [t for t in tags if any(t.startswith(q) for q in queries)]
    inside = [t for t in tags if t not in starts and any(q in t for q in queries)]
    return (starts + inside)[:limit]


def prompt_problems(form: GenerateForm, vocab: Any, tags: list[str], max_tags: int) -> tuple[dict[str, str], list[str]]:
    """Each prompt field's refusal (unknown tags with up to 3 close vocabulary tags each, more tags than
    the model reads), and the unknown tags of both prompts in order."""
    problems: dict[str, str] = {}
    unknown_all: list[str] = []
    for name in ("prompt", "negative"):
        known, unknown = vocab.parse_prompt(getattr(form, name))
        unknown_all += unknown
        said = []
        if unknown:
            hints = [hint(t, tags) for t in unknown]
            said.append(f"not in the vocabulary: {'; '.join(hints)}. Remove or correct them")
        if len(known) + len(unknown) > max_tags:
            extra = len(known) + len(unknown) - max_tags
            said.append(f"has {len(known) + len(unknown)} tags; the model reads at most {max_tags} per prompt "
                        f"(remove {extra})")
        if said:
            problems[name] = f"{LABELS[name]}: {'; '.join(said)}."
    return problems, unknown_all


def hint(tag: str, tags: list[str]) -> str:
    """"smil (did you mean: smile?)", or the tag alone when nothing in the vocabulary is close."""
    close = difflib.get_close_matches(normalize_tag(tag), tags, n=3, cutoff=0.6)
    return f"{tag} (did you mean: {', '.join(close)}?)" if close else tag
