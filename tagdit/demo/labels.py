"""What a demo image shows: the tag groups, the two characters, and `Spec` (attributes -> tags)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

RGB = tuple[int, int, int]

HAIR: dict[str, RGB] = {
    "blonde hair": (247, 214, 102),
    "black hair": (40, 36, 46),
    "blue hair": (58, 104, 214),
    "pink hair": (248, 150, 196),
    "red hair": (206, 38, 44),
    "white hair": (238, 238, 244),
    "brown hair": (124, 78, 42),
}
LENGTHS = ("short hair", "long hair")
EYES: dict[str, RGB] = {
    "blue eyes": (40, 110, 232),
    "red eyes": (214, 30, 40),
    "green eyes": (40, 172, 72),
    "yellow eyes": (242, 202, 30),
    "purple eyes": (142, 60, 204),
}
MOUTHS = ("smile", "open mouth", "closed mouth")
ACCESSORIES = ("hat", "glasses", "hair bow")
BACKGROUNDS: dict[str, RGB] = {
    "white background": (255, 255, 255),
    "blue background": (126, 172, 240),
    "pink background": (250, 182, 212),
    "green background": (150, 214, 150),
    "yellow background": (250, 234, 140),
}
GREY_TAGS = ("monochrome", "greyscale")
# Characters (category 4): a fixed look; an image shows the character iff its attributes match.
CHARACTERS: dict[str, dict] = {
    "aoi (tagdit)": {"hair": "blue hair", "length": "long hair", "eyes": "yellow eyes",
                     "accessories": ("hair bow",)},
    "akane (tagdit)": {"hair": "red hair", "length": "short hair", "eyes": "green eyes",
                       "accessories": ("glasses",)},
}
GENERAL_TAGS: list[str] = [*HAIR, *LENGTHS, *EYES, "closed eyes", *MOUTHS, *ACCESSORIES,
                           *BACKGROUNDS, *GREY_TAGS]
CHARACTER_TAGS: list[str] = list(CHARACTERS)
RATINGS = ("general", "sensitive", "questionable", "explicit")  # every demo image is "general"


@dataclass
class Spec:
    """What one image shows (its tags follow from this)."""

    hair: str
    length: str
    eyes: str
    eyes_closed: bool
    mouth: str
    accessories: tuple[str, ...]
    background: str
    grey: bool
    transparent: bool

    def tags(self) -> list[str]:
        """True tags in display form: general tags in GENERAL_TAGS order, then characters."""
        on = {self.length, self.mouth, *self.accessories}
        if self.eyes_closed:
            on.add("closed eyes")
        if self.grey:
            on |= {"white background", *GREY_TAGS}  # greyscale art is drawn on white, colours untagged
        else:
            on |= {self.hair, "white background" if self.transparent else self.background}
            if not self.eyes_closed:
                on.add(self.eyes)
        chars = [name for name, look in CHARACTERS.items() if self.is_character(look)]
        return [t for t in GENERAL_TAGS if t in on] + chars

    def is_character(self, look: dict) -> bool:
        return (not self.grey and not self.eyes_closed and self.hair == look["hair"]
                and self.length == look["length"] and self.eyes == look["eyes"]
                and set(self.accessories) == set(look["accessories"]))


def sample_spec(rng: np.random.Generator, mode: str) -> Spec:
    """Draw the attributes of one image (characters are over-sampled so the tagger sees them)."""
    grey = mode in ("L", "LA", "grey-RGB")
    transparent = mode in ("RGBA", "LA")
    accessories = tuple(a for a in ACCESSORIES if rng.random() < 0.22)
    spec = Spec(
        hair=str(rng.choice(list(HAIR))),
        length=str(rng.choice(LENGTHS)),
        eyes=str(rng.choice(list(EYES))),
        eyes_closed=bool(rng.random() < 0.15),
        mouth=str(rng.choice(MOUTHS, p=[0.4, 0.3, 0.3])),
        accessories=accessories,
        background=str(rng.choice(list(BACKGROUNDS), p=[0.3, 0.175, 0.175, 0.175, 0.175])),
        grey=grey,
        transparent=transparent,
    )
    u = rng.random()
    if not grey and u < 0.12:  # 6% each: a character's look, a third of them off by one detail
        look = CHARACTERS[CHARACTER_TAGS[int(u / 0.06)]]
        spec.hair, spec.length, spec.eyes = look["hair"], look["length"], look["eyes"]
        spec.accessories, spec.eyes_closed = tuple(look["accessories"]), False
        if rng.random() < 1 / 3:  # a near miss: not the character (teaches the tagger what matters)
            miss = int(rng.integers(3))
            if miss == 0:
                spec.accessories = tuple(a for a in ACCESSORIES if (a in spec.accessories) != (a == "hat"))
            elif miss == 1:
                spec.eyes = str(rng.choice([e for e in EYES if e != look["eyes"]]))
            else:
                spec.length = next(x for x in LENGTHS if x != look["length"])
    return spec
