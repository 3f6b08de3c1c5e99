"""One document from its entity: the kind's draft, cut to 4-6 facts, padded with filler sentences to the word
budget."""

from __future__ import annotations

import random

from .entities import SPECS
from .facts import Probe, draft
from .world import World, WorldEntity

MIN_WORDS, MAX_WORDS = 60, 130
_PRONOUN_START = ("It ", "Its ", "He ", "She ", "His ", "Her ")


def _pad(sentences: list[str], fillers: list[str], rng: random.Random) -> None:
    """Insert filler sentences (in place) until the text has at least :data:`MIN_WORDS` words, sometimes one
    more for variety, never going over :data:`MAX_WORDS`."""
    words = sum(len(x.split()) for x in sentences)
    extra = rng.random() < 0.3  # sometimes one filler more than needed, for variety
    while fillers and (words < MIN_WORDS or extra):
        filler = fillers.pop()
        if words + len(filler.split()) > MAX_WORDS:
            break
        if words >= MIN_WORDS:
            extra = False
        # never put a filler in front of a sentence that starts with a pronoun (its referent would change)
        slots = [len(sentences)] + [
            i for i in range(1, len(sentences)) if not sentences[i].startswith(_PRONOUN_START)
        ]
        sentences.insert(rng.choice(slots), filler)
        words += len(filler.split())


def compose(e: WorldEntity, w: World, rng: random.Random) -> tuple[str, list[Probe], list[WorldEntity]]:
    """Draft a document with 4-6 facts (at least 2 outside the opening sentence), add filler sentences up to
    the word budget; return the text, its probes and the entities with their own document it mentions."""
    target = rng.randint(4, 6)
    d = draft(SPECS[e.kind], e, w, rng, target - 2)
    k = max(0, target - len(d.intro.probes))
    preferred = [i for i, (_, _, pref) in enumerate(d.body) if pref and rng.random() < 0.85]
    rest = [i for i in range(len(d.body)) if i not in preferred]
    rng.shuffle(rest)
    chosen = sorted((preferred + rest)[:k])
    sentences = [d.intro.text] + [d.body[i][0].text for i in chosen]
    probes = list(d.intro.probes) + [p for i in chosen for p in d.body[i][0].probes]
    refs = list(d.intro_refs) + [r for i in chosen for r in d.body[i][1]]
    fillers = list(d.fillers)
    rng.shuffle(fillers)
    _pad(sentences, fillers, rng)
    unique_refs: list[WorldEntity] = []
    for r in refs:
        if all(r is not u for u in unique_refs):
            unique_refs.append(r)
    return " ".join(sentences), probes, unique_refs
