"""Relations, value sets, chains and templates of the world.

An entity (one drawn object) has four relations asked about its *image*: `country` and `maker` (the
two that edits change, each the root of a chain), and `owner` and `material` (the withholdable ones:
some of these facts are never shown to the backbone, which then answers them wrongly; UniKE's
triplets come from there). Its colour, shape and pattern are asked too: the backbone must see them.

Chains are text facts between values: country -> capital -> continent -> ocean -> island and
maker -> birthplace -> river. A composite question about an image ("the capital of the country this
object comes from") needs the entity's fact plus 1..4 chain hops; after a counterfactual edit its
answer follows the new value, which is what portability measures.

Every relation has training templates and held-out paraphrase templates. The held-out ones are never
shown to the backbone (they are T-Generality's rephrasings); they reuse the training vocabulary in a
new combination (a training template's opening with another's ending) so that a word-level model
has seen every word, as a real LM has seen every word of a paraphrase.
"""

from __future__ import annotations

import random

#: Image questions about the entity: relation -> (training templates, held-out templates).
IMAGE_TEMPLATES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "country": (
        ("Which country is this object from?", "What country does this object come from?"),
        ("Which country does this object come from?",),
    ),
    "maker": (
        ("Who made this object?", "Who is the maker of this object?"),
        ("Who is the one who made this object?",),
    ),
    "owner": (
        ("Who owns this object?", "Who is the owner of this object?"),
        ("Who is the one who owns this object?",),
    ),
    "material": (
        ("What material is this object made of?", "What is the material of this object?"),
        ("Which material is this object made of?",),
    ),
    "colour": (("What colour is this object?", "What is the colour of this object?"), ()),
    "shape": (("What shape is this object?", "What is the shape of this object?"), ()),
    "pattern": (("What pattern does this object have?", "What is the pattern of this object?"), ()),
}
EDITABLE = ("country", "maker")
WITHHOLDABLE = ("owner", "material")
#: The relations edits change, in order: a world with `edits_per_entity` n edits the first n. The
#: demo edits the two chain roots; the lifelong world all four facts (owner and material have no
#: chain, so their edits have no portability questions).
EDIT_ORDER = (*EDITABLE, *WITHHOLDABLE)
ATTRIBUTES = ("colour", "shape", "pattern")

#: Text facts (T-Locality, and the chain links): relation -> (subject kind, train, held-out templates).
TEXT_TEMPLATES: dict[str, tuple[str, tuple[str, ...], tuple[str, ...]]] = {
    "capital": ("country", ("What is the capital of {s}?", "Which city is the capital of {s}?"), ()),
    "continent": ("capital", ("On which continent is {s}?", "Which continent is {s} on?"), ()),
    "ocean": ("continent", ("Which ocean borders {s}?", "What ocean is next to {s}?"), ()),
    "island": ("ocean", ("What is the largest island in {s}?", "Which island is the largest in {s}?"), ()),
    "birthplace": ("maker", ("Where was {s} born?", "In which town was {s} born?"), ()),
    "river": ("birthplace", ("Which river flows through {s}?", "What river runs through {s}?"), ()),
}
#: Chains rooted at each editable relation, in hop order.
CHAINS: dict[str, tuple[str, ...]] = {
    "country": ("capital", "continent", "ocean", "island"),
    "maker": ("birthplace", "river"),
}
#: Composite image questions: (root relation, hops) -> template. The last two words name the root fact.
COMPOSITE_TEMPLATES: dict[tuple[str, int], str] = {
    ("country", 1): "What is the capital of the country this object comes from?",
    ("country", 2): "On which continent is the capital of the country this object comes from?",
    ("country", 3): "Which ocean borders the continent of the capital of the country this object comes from?",
    ("country", 4): (
        "What is the largest island in the ocean next to the continent of the capital of the country "
        "this object comes from?"
    ),
    ("maker", 1): "Where was the maker of this object born?",
    ("maker", 2): "Which river flows through the town where the maker of this object was born?",
}
#: Captions (the E-IC analogue): what the object looks like and where it comes from.
CAPTION_FORMAT = "{colour} {pattern} {shape} from {country}"
CAPTION_TEMPLATES: tuple[tuple[str, ...], tuple[str, ...]] = (
    ("Describe this object.", "Write a caption for this object."),
    ("Write a description for this object.",),
)
MATERIALS = ("wood", "stone", "glass", "iron", "clay", "silk", "copper", "bone", "wax", "jade")
#: Words the prompt layouts add (VLM prompt formats, IKE's "New Fact: ... Prompt: ...", the VQA template).
FRAME_TEXT = ("USER: ASSISTANT: New Fact: Prompt: Question: Short answer:",)

_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kr", "st", "tr")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ou")
_CODAS = ("", "", "n", "r", "l", "s", "th", "nd")


def make_names(
    rng: random.Random, count: int, taken: set[str], syllables: tuple[int, int] = (2, 3)
) -> list[str]:
    """`count` new capitalised pseudo-words, none in `taken` (which is updated)."""
    names: list[str] = []
    while len(names) < count:
        n = rng.randint(*syllables)
        word = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(n)) + rng.choice(_CODAS)
        word = word.capitalize()
        if word not in taken and len(word) <= 10:
            taken.add(word)
            names.append(word)
    return names
