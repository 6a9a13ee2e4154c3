"""Prompts drawn from a dataset: captions the DiT can read, varied default prompts, grid rows."""

from __future__ import annotations

import logging
import math
from collections import Counter
from typing import Any

from PIL import Image

from tagdit.config import PipelineConfig

log = logging.getLogger(__name__)


def caption(meta: dict, vocab: Any, max_tags: int) -> list[str]:
    """An image's tags that the DiT knows, in score order."""
    return [t for t in meta["tags"] if vocab.lookup(t) == t][:max_tags]


def default_prompts(reals: list[tuple[Image.Image, dict]], vocab: Any, n: int, max_tags: int) -> list[list[str]]:
    """Frequent yet varied tag combinations drawn from the real validation captions.

    Greedy: each pick is the caption with the largest share of tags no earlier pick used, ties
    going to the most frequent tags (mean log-frequency); captions with the same tag set count once.
    """
    captions = [caption(m, vocab, max_tags) for _, m in reals]
    freq = Counter(t for c in captions for t in c)
    unique = list({frozenset(c): c for c in reversed(captions) if c}.values())  # first occurrence wins
    score = {tuple(c): sum(math.log(freq[t]) for t in c) / len(c) for c in unique}
    chosen: list[list[str]] = []
    used: set[str] = set()
    while unique and len(chosen) < n:
        best = max(unique, key=lambda c: (sum(t not in used for t in c) / len(c), score[tuple(c)], c))
        unique.remove(best)
        chosen.append(best)
        used.update(best)
    return chosen


def negative_example(cfg: PipelineConfig, prompts: list[list[str]], vocab: Any) -> tuple[list[str], list[str]]:
    """(prompt, negative): the config's, or the first prompt with its first tag as the negative removed."""
    if cfg.evaluate.negative_example:
        p, n = cfg.evaluate.negative_example
        return vocab.parse_prompt(p)[0], vocab.parse_prompt(n)[0]
    first = prompts[0]
    return first[1:], first[:1]


def prompt_rows(cfg: PipelineConfig, painter: Any, reals: list) -> tuple[list[list[str]], list[tuple]]:
    """(metric prompts, grid rows): each prompt, an unconditional row and a negative-prompt row."""
    if cfg.evaluate.prompts:
        prompts = []
        for p in cfg.evaluate.prompts:
            known, unknown = painter.vocab.parse_prompt(p)
            if unknown:
                log.warning("evaluate prompt %r: tags not in the vocabulary, ignored: %s", p, unknown)
            prompts.append(known)
    else:
        prompts = default_prompts(reals, painter.vocab, cfg.evaluate.n_prompts, painter.max_tags)
    if not prompts:
        raise ValueError("no evaluation prompts: the validation split has no tags in the vocabulary")
    neg_prompt, neg = negative_example(cfg, prompts, painter.vocab)
    rows = [(p, [], ", ".join(p)) for p in prompts]
    rows.append(([], [], "(unconditional)"))
    rows.append((neg_prompt, neg, f"{', '.join(neg_prompt)}  |  negative: {', '.join(neg)}"))
    return prompts, rows
