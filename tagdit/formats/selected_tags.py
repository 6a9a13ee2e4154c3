"""`selected_tags.csv`: the WD tagger's label table (tag_id,name,category,count), in output order.

Categories are Danbooru's: rating rows (9) come first, then general (0) and character (4) tags.
Names are stored in Danbooru form (`long_hair`) and used in display form (`long hair`), except
kaomoji such as `^_^`, which keep their underscores.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tagdit.files import atomic_path

RATING = 9  # the four rating rows (general, sensitive, questionable, explicit)
GENERAL = 0
CHARACTER = 4
UNKNOWN = -1  # category of a sidecar tag the tagger does not know (tags.parquet only)
RATING_ID = 9999999  # the WD csv gives every rating row this tag_id
HEADER = ["tag_id", "name", "category", "count"]
# Tag names kept verbatim (the reference keeps their underscores).
KAOMOJIS = frozenset(
    "0_0 (o)_(o) +_+ +_- ._. <o>_<o> <|>_<|> =_= >_< 3_3 6_9 >_o @_@ ^_^ o_o u_u x_x |_| ||_||".split()
)


def display_name(raw: str) -> str:
    """`long_hair` -> `long hair`; kaomoji such as `^_^` stay as they are."""
    raw = raw.strip()
    return raw if raw in KAOMOJIS else raw.replace("_", " ")


def raw_name(name: str) -> str:
    """Display name -> the csv's Danbooru form (`blue hair` -> `blue_hair`)."""
    return name.replace(" ", "_")


@dataclass(frozen=True)
class TagLabels:
    """The rows of `selected_tags.csv`: display names and categories, in model output order."""

    names: list[str]
    categories: np.ndarray  # (T,) int

    @classmethod
    def from_csv(cls, path: str | Path) -> TagLabels:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        if not rows or not {"name", "category"} <= set(rows[0]):
            raise ValueError(f"{path}: expected a CSV with header {','.join(HEADER)}")
        return cls([display_name(r["name"]) for r in rows], np.array([int(r["category"]) for r in rows]))

    def indexes(self, category: int) -> np.ndarray:
        return np.flatnonzero(self.categories == category)

    def category_of(self) -> dict[str, int]:
        return {n: int(c) for n, c in zip(self.names, self.categories, strict=True)}


def write_tags_csv(path: Path, names: list[str], categories: list[int], counts) -> None:
    """Write `selected_tags.csv` in the WD layout (atomically); rating rows get `RATING_ID`."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(HEADER)
        for i, (name, cat) in enumerate(zip(names, categories, strict=True)):
            tag_id = RATING_ID if cat == RATING else 100_000 + i
            w.writerow([tag_id, raw_name(name), cat, int(counts[i])])
