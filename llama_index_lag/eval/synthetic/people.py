"""Person and town documents as tables of fact specs (see :mod:`.facts`): what a document about a person
or a town says, in which order, and how each fact is asked, claimed and faked.

The order of the body sentences, the text variants and the alternative facts are part of the RNG sequence
(see :func:`.facts.draft`): changing them changes the generated benchmarks.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from . import vocabulary as V
from .facts import (
    Fact,
    Fake,
    Intro,
    IntroFact,
    KindSpec,
    Line,
    fake_pool,
    fresh_person,
    fresh_word,
    other_in,
    other_number,
    other_town,
    other_year,
)
from .world import World, WorldEntity


def _person_context(e: WorldEntity) -> dict[str, Any]:
    """Pronouns, the short name of the fillers and the age at death."""
    a = e.attrs
    pr, poss, obj = ("he", "his", "him") if a["he"] else ("she", "her", "her")
    age = a["died"] - a["born"] if a["died"] is not None else None
    return {"pr": pr, "Pr": pr.capitalize(), "poss": poss, "obj": obj, "Short": a["given"], "age": age}


def _other_province(w: World, ctx: Mapping[str, Any], attr: str, value: str) -> Fake:
    """Another province of the world."""
    return fake_pool(value, w.provinces)


PERSON = KindSpec(
    intro=Intro(
        always=(
            Fact(
                "profession",
                ("What was {name}'s profession?", "What did {name} work as?"),
                "{name} was {v:a}.",
                other_in(V.PROFESSIONS),
            ),
        ),
        optional=(
            IntroFact(
                Fact("born", "In which year was {name} born?", "{name} was born in {v}.", other_year), 0.75
            ),
            IntroFact(
                Fact(
                    "town",
                    "In which town was {name} born?",
                    "{name} was born in the town of {v}.",
                    other_town,
                    answers=("{town}", "the town of {town}"),
                ),
                0.75,
                ref="town_ent",
            ),
        ),
        texts={
            (True, True): "{name} was {profession:a} born in {born} in the town of {town}.",
            (True, False): "{name} was {profession:a} born in {born}.",
            (False, True): "{name} was {profession:a} born in the town of {town}.",
            (False, False): "{name} was {profession:a}.",
        },
    ),
    body=(
        Line(
            (
                "{Pr} learned the trade as an apprentice of {mentor}, a respected master of the craft.",
                "As a young apprentice {pr} was trained by {mentor}, "
                "who taught {obj} patience and precision.",
            ),
            Fact(
                "mentor",
                "Who trained {name} as an apprentice?",
                "{name} trained as an apprentice under {v}.",
                fresh_person,
            ),
        ),
        Line(
            (
                "In {married} {pr} married {spouse}, and the couple lived above the workshop.",
                "In {married} {pr} married {spouse} in a small ceremony with close friends.",
            ),
            Fact("spouse", "Whom did {name} marry?", "{name} married {v}.", fresh_person),
            alt=Fact(
                "married",
                "In which year did {name} marry {spouse}?",
                "{name} married {spouse} in {v}.",
                other_year,
            ),
        ),
        Line(
            "For most of {poss} career {pr} worked for the {employer.title}, "
            "where colleagues valued {poss} skill.",
            Fact(
                "employer",
                "Which organisation did {name} work for?",
                "{name} worked for the {v}.",
                fresh_word("stem", " {employer.attrs[word]}"),
                answers=("{employer.title}",),
            ),
            refs=("employer",),
            when="employer",
            preferred=True,
        ),
        Line(
            "{Pr} was the founder of the {founded.title}, which still exists today.",
            Fact(
                "founded",
                "Which organisation did {name} found?",
                "{name} founded the {v}.",
                fresh_word("stem", " {founded.attrs[word]}"),
                answers=("{founded.title}",),
            ),
            refs=("founded",),
            when="founded",
            preferred=True,
        ),
        Line(
            "{Pr} invented the {invented.title}, which made {poss} name known far beyond {poss} workshop.",
            Fact(
                "invented",
                "Which device did {name} invent?",
                "{name} invented the {v}.",
                fresh_word("stem", " {invented.attrs[word]}"),
                answers=("{invented.title}",),
            ),
            refs=("invented",),
            when="invented",
            preferred=True,
        ),
        Line(
            (
                "{Pr} kept {pet:a} named {pet_name}, which followed {obj} almost everywhere.",
                "At home {pr} kept {pet:a} named {pet_name}, a favourite of the neighbourhood children.",
            ),
            Fact(
                "pet_name",
                "What was the name of {name}'s {pet}?",
                "{name} kept {pet:a} named {v}.",
                fresh_word("pet"),
            ),
        ),
        Line(
            (
                "In {poss} spare time {pr} played the {instrument} at village dances.",
                "In {poss} spare time {pr} played the {instrument}, often late in the evening.",
            ),
            Fact(
                "instrument",
                "Which musical instrument did {name} play?",
                "{name} played the {v}.",
                other_in(V.INSTRUMENTS),
            ),
        ),
        Line(
            "In {medal_year} {pr} received the {medal} Medal for {poss} contributions to {poss} craft.",
            Fact(
                "medal",
                "Which medal did {name} receive in {medal_year}?",
                "{name} received the {v} in {medal_year}.",
                fresh_word("stem", " Medal"),
                answers=("{medal} Medal", "{medal}"),
            ),
            alt=Fact(
                "medal_year",
                "In which year did {name} receive the {medal} Medal?",
                "{name} received the {medal} Medal in {v}.",
                other_year,
            ),
        ),
        Line(
            "Later in life {pr} moved to the town of {moved}, where {pr} lived in a house near the market.",
            Fact(
                "moved",
                "To which town did {name} move later in life?",
                "Later in life {name} moved to the town of {v}.",
                other_town,
                answers=("{moved}", "the town of {moved}"),
            ),
            refs=("moved_ent",),
        ),
        Line(
            "{Pr} died in {died} at the age of {age}.",
            Fact("died", "In which year did {name} die?", "{name} died in {v}.", other_year),
            when="died",
        ),
    ),
    context=_person_context,
)

TOWN = KindSpec(
    intro=Intro(
        optional=(
            IntroFact(
                Fact(
                    "province",
                    ("In which province is {name}?", "In which province is the town of {name}?"),
                    "{name} is in the province of {v}.",
                    _other_province,
                    answers=("{province}", "the province of {province}"),
                ),
                0.8,
            ),
        ),
        texts={
            (True,): "{name} is {size:a} town in the province of {province}.",
            (False,): "{name} is {size:a} town.",
        },
    ),
    body=(
        Line(
            (
                "{name} lies on the {river} River, which flows past an old water mill.",
                "{name} lies on the {river} River, and boats once carried goods along it.",
            ),
            Fact(
                "river",
                "On which river does {name} lie?",
                "{name} lies on the {v} River.",
                fresh_word("river"),
                answers=("{river}", "{river} River"),
            ),
        ),
        Line(
            (
                "{name} was founded in {founded} by a group of farming families.",
                "{name} was founded in {founded} as a small trading post.",
            ),
            Fact("founded", "In which year was {name} founded?", "{name} was founded in {v}.", other_year),
        ),
        Line(
            "About {population:,} people live in {name} today.",
            Fact(
                "population",
                "About how many people live in {name}?",
                "About {v} people live in {name}.",
                other_number,
                answers=("{population:,}",),
            ),
        ),
        Line(
            "{name} is known for its {product}, sold at markets across the province.",
            Fact(
                "product",
                "Which product is {name} known for?",
                "{name} is known for its {v}.",
                other_in(V.PRODUCTS),
            ),
        ),
        Line(
            "The town hall of {name} has {roof:a} roof that can be seen from far away.",
            Fact(
                "roof",
                "What colour is the roof of the town hall in {name}?",
                "The town hall of {name} has {v:a} roof.",
                other_in(V.COLOURS),
            ),
        ),
        Line(
            "The mayor of {name} is {mayor}, who was elected after a close vote.",
            Fact("mayor", "Who is the mayor of {name}?", "The mayor of {name} is {v}.", fresh_person),
        ),
        Line(
            "A market is held in {name} every {market}, "
            "when farmers from the surrounding villages sell their produce.",
            Fact(
                "market",
                "On which day of the week is the market held in {name}?",
                "A market is held in {name} every {v}.",
                other_in(V.WEEKDAYS),
                answers=("{market}", "{market}s"),
            ),
        ),
    ),
)
