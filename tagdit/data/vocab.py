"""The DiT's tag vocabulary (`vocab.json`, written by the shard stage) and the tag conditioning it feeds.

`vocab.json` is `{"tokens": [...]}`, the token with id i at position i. Ids: 0 = <pad>, 1 = <unk>,
2 = <cls>; a caption is encoded as [cls, tag ids…] padded to max_tags + 1. The null condition (for
classifier-free guidance) is [cls] followed by padding only. This module is the only reader and
writer of the file.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from tagdit.files import write_json_atomic

PAD, UNK, CLS = 0, 1, 2
SPECIALS = ("<pad>", "<unk>", "<cls>")


def normalize_tag(tag: str) -> str:
    """Prompt spelling -> vocabulary spelling: lower case, `_` -> space, outer spaces stripped."""
    return tag.strip().lower().replace("_", " ")


VOCAB_FILE = "vocab.json"


@dataclass
class Vocab:
    """Token list with id lookup; `tokens[i]` is the tag with id i."""

    tokens: list[str]
    index: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if tuple(self.tokens[: len(SPECIALS)]) != SPECIALS:
            raise ValueError(f"vocab must start with {SPECIALS}, got {self.tokens[: len(SPECIALS)]}")
        self.index = {tok: i for i, tok in enumerate(self.tokens)}

    @classmethod
    def load(cls, path: str | Path) -> Vocab:
        return cls(list(json.loads(Path(path).read_text())["tokens"]))

    @staticmethod
    def of_run(run_dir: str | Path, dataset_vocab: str | Path) -> Path:
        """The vocabulary a DiT run trains and draws with: the copy in its folder (the dataset's when it
        started: token ids never shift under a trained model), else the dataset's (an older run)."""
        return Path(run_dir) / VOCAB_FILE if (Path(run_dir) / VOCAB_FILE).is_file() else Path(dataset_vocab)

    @classmethod
    def from_tags(cls, tags: list[str]) -> Vocab:
        """The specials followed by `tags` (ids 3, 4, ... in order)."""
        return cls([*SPECIALS, *tags])

    def save(self, path: str | Path) -> None:
        """Write `vocab.json` (atomically)."""
        write_json_atomic(path, {"tokens": self.tokens})

    def __len__(self) -> int:
        return len(self.tokens)

    def __contains__(self, tag: str) -> bool:
        return tag in self.index

    def lookup(self, tag: str) -> str | None:
        """The vocabulary's spelling of a tag (as written, e.g. kaomoji `^_^`, or normalised), or None."""
        for cand in (tag.strip().lower(), normalize_tag(tag)):
            if cand in self.index and self.index[cand] >= len(SPECIALS):
                return cand
        return None

    def encode(self, tags: list[str], max_tags: int) -> list[int]:
        """[cls] + ids of the first `max_tags` tags (unknown -> <unk>), padded to max_tags + 1."""
        ids = [self.index.get(t, UNK) for t in tags[:max_tags]]
        return [CLS, *ids] + [PAD] * (max_tags - len(ids))

    def null(self, max_tags: int) -> list[int]:
        """The null condition: [cls] + padding."""
        return self.encode([], max_tags)

    def parse_prompt(self, prompt: str) -> tuple[list[str], list[str]]:
        """"blue hair, Smile" -> (known tags in vocab spelling, unknown tags as written); no duplicates."""
        known: list[str] = []
        unknown: list[str] = []
        for raw in prompt.split(","):
            if not raw.strip():
                continue
            tag = self.lookup(raw)
            if tag is None:
                if raw.strip() not in unknown:
                    unknown.append(raw.strip())
            elif tag not in known:
                known.append(tag)
        return known, unknown


def augment_tags(
    tags: list[str],
    rng: random.Random,
    *,
    caption_drop: float,
    tag_drop: float,
    shuffle: bool,
    max_tags: int,
) -> list[str]:
    """Training-time conditioning: drop the whole caption (-> null), shuffle, drop each tag, cap.

    The original's order: caption dropped with p = caption_drop, then tags shuffled, then each tag
    dropped with p = tag_drop; at most `max_tags` survive.
    """
    if rng.random() < caption_drop:
        return []
    tags = list(tags)
    if shuffle:
        rng.shuffle(tags)
    return [t for t in tags if rng.random() >= tag_drop][:max_tags]
