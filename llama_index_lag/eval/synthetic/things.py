"""Organisation, device, ship and festival documents as tables of fact specs (see :mod:`.facts`): what a
document about one of them says, in which order, and how each fact is asked, claimed and faked.

The order of the body sentences, the text variants and the alternative facts are part of the RNG sequence
(see :func:`.facts.draft`): changing them changes the generated benchmarks.
"""

from __future__ import annotations

import random
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
    fresh_person,
    fresh_word,
    num,
    other_in,
    other_number,
    other_town,
    other_year,
)
from .world import World


def _other_emblem(w: World, ctx: Mapping[str, Any], attr: str, value: str) -> Fake:
    """An emblem of any colour and another animal."""

    def fake(r: random.Random) -> str:
        return f"{r.choice(V.EMBLEM_COLOURS)} {r.choice([x for x in V.EMBLEM_ANIMALS if x not in value])}"

    return fake


ORGANISATION = KindSpec(
    intro=Intro(
        optional=(
            IntroFact(
                Fact(
                    "year",
                    "In which year was the {name} founded?",
                    "The {name} was founded in {v}.",
                    other_year,
                ),
                0.75,
            ),
            IntroFact(
                Fact("founder", "Who founded the {name}?", "The {name} was founded by {v}.", fresh_person),
                0.6,
                ref="founder_ent",
                chance_with_ref=0.9,
            ),
        ),
        texts={
            (True, True): "The {name} is {desc:a} founded in {year} by {founder}.",
            (True, False): "The {name} is {desc:a} founded in {year}.",
            (False, True): "The {name} is {desc:a} founded by {founder}.",
            (False, False): "The {name} is {desc:a}.",
        },
    ),
    body=(
        Line(
            "Its headquarters are in the town of {hq}, in a tall building near the main square.",
            Fact(
                "hq",
                "In which town does the {name} have its headquarters?",
                "The {name} has its headquarters in {v}.",
                other_town,
                answers=("{hq}", "the town of {hq}"),
            ),
            refs=("hq_ent",),
        ),
        Line(
            "The {name} has {members:,} members, most of whom live nearby.",
            Fact(
                "members",
                "How many members does the {name} have?",
                "The {name} has {v} members.",
                other_number,
                answers=num(),
            ),
        ),
        Line(
            "Its emblem is {emblem:a}, which appears on all of its letters.",
            Fact(
                "emblem",
                "What is the emblem of the {name}?",
                "The emblem of the {name} is {v:a}.",
                _other_emblem,
            ),
        ),
        Line(
            "The {name} holds its annual assembly every {assembly}, when the members elect their officers.",
            Fact(
                "assembly",
                "In which month does the {name} hold its annual assembly?",
                "The {name} holds its annual assembly every {v}.",
                other_in(V.MONTHS),
            ),
        ),
        Line(
            "The {name} is currently led by {leader}, who took office a few years ago.",
            Fact(
                "leader",
                "Who currently leads the {name}?",
                "The {name} is currently led by {v}.",
                fresh_person,
            ),
        ),
    ),
)

DEVICE = KindSpec(
    intro=Intro(
        optional=(
            IntroFact(
                Fact("inventor", "Who invented the {name}?", "The {name} was invented by {v}.", fresh_person),
                0.7,
                ref="inventor_ent",
                chance_with_ref=0.9,
            ),
            IntroFact(
                Fact(
                    "year",
                    "In which year was the {name} invented?",
                    "The {name} was invented in {v}.",
                    other_year,
                ),
                0.75,
            ),
        ),
        texts={
            (True, True): "The {name} is {desc:a} invented by {inventor} in {year}.",
            (True, False): "The {name} is {desc:a} invented by {inventor}.",
            (False, True): "The {name} is {desc:a} invented in {year}.",
            (False, False): "The {name} is {desc:a} of unusual design.",
        },
    ),
    body=(
        Line(
            "Its frame is made of {material}, which made it sturdy but expensive.",
            Fact(
                "material",
                "What material is the frame of the {name} made of?",
                "The frame of the {name} is made of {v}.",
                other_in(V.MATERIALS),
            ),
        ),
        Line(
            "The {name} weighs {weight:,} kilograms.",
            Fact(
                "weight",
                "How many kilograms does the {name} weigh?",
                "The {name} weighs {v} kilograms.",
                other_number,
                answers=num("kilograms"),
            ),
        ),
        Line(
            "It was used mainly by {users[0]}, who valued its reliability.",
            Fact(
                "users",
                "Who mainly used the {name}?",
                "The {name} was used mainly by {v}.",
                other_in(tuple(u for u, _ in V.DEVICE_USERS)),
                answers=("{users[0]}", "{users[1]}"),
            ),
        ),
        Line(
            "The first {name} was built in a workshop in {town}.",
            Fact(
                "town",
                "In which town was the first {name} built?",
                "The first {name} was built in {v}.",
                other_town,
                answers=("{town}", "the town of {town}"),
            ),
            refs=("town_ent",),
        ),
        Line(
            "Only {units} copies of the {name} were ever made, and few of them survive.",
            Fact(
                "units",
                "How many copies of the {name} were ever made?",
                "Only {v} copies of the {name} were ever made.",
                other_number,
                answers=num(),
            ),
        ),
        Line(
            "It was usually painted {colour} to protect it from damp.",
            Fact(
                "colour",
                "What colour was the {name} usually painted?",
                "The {name} was usually painted {v}.",
                other_in(V.COLOURS),
            ),
        ),
    ),
)

SHIP = KindSpec(
    intro=Intro(
        optional=(
            IntroFact(
                Fact(
                    "year",
                    "In which year was the {name} launched?",
                    "The {name} was launched in {v}.",
                    other_year,
                ),
                0.8,
            ),
        ),
        texts={
            (True,): "The {name} was {type:a} launched in {year}.",
            (False,): "The {name} was {type:a} built for coastal trade.",
        },
    ),
    body=(
        Line(
            "Its home port was {port}, where it spent every winter.",
            Fact(
                "port",
                "What was the home port of the {name}?",
                "The home port of the {name} was {v}.",
                other_town,
                answers=("{port}", "the port of {port}"),
            ),
            refs=("port_ent",),
        ),
        Line(
            "The {name} was built by the {builder.title}.",
            Fact(
                "builder",
                "Which company built the {name}?",
                "The {name} was built by the {v}.",
                fresh_word("stem", " Company"),
                answers=("{builder.title}",),
            ),
            refs=("builder",),
            when="builder",
            preferred=True,
        ),
        Line(
            "Its first captain was {captain}, who commanded it for many years.",
            Fact(
                "captain",
                "Who was the first captain of the {name}?",
                "The first captain of the {name} was {v}.",
                fresh_person,
            ),
        ),
        Line(
            "The {name} was {length} metres long.",
            Fact(
                "length",
                "How long was the {name}, in metres?",
                "The {name} was {v} metres long.",
                other_number,
                answers=num("metres"),
            ),
        ),
        Line(
            "Its hull was painted {hull}, which made it easy to recognise at sea.",
            Fact(
                "hull",
                "What colour was the hull of the {name}?",
                "The hull of the {name} was painted {v}.",
                other_in(V.COLOURS),
            ),
        ),
        Line(
            "For most of its career the {name} carried {cargo}.",
            Fact(
                "cargo",
                "What did the {name} carry for most of its career?",
                "For most of its career the {name} carried {v}.",
                other_in(V.CARGOES),
            ),
        ),
        Line(
            "The {name} sailed with a crew of {crew}.",
            Fact(
                "crew",
                "How many crew members did the {name} sail with?",
                "The {name} sailed with a crew of {v}.",
                other_number,
                answers=num(),
            ),
        ),
    ),
)

FESTIVAL = KindSpec(
    intro=Intro(
        optional=(
            IntroFact(
                Fact(
                    "month",
                    "In which month is the {name} held?",
                    "The {name} is held every {v}.",
                    other_in(V.MONTHS),
                ),
                0.75,
            ),
            IntroFact(
                Fact(
                    "town",
                    "In which town is the {name} held?",
                    "The {name} is held in {v}.",
                    other_town,
                    answers=("{town}", "the town of {town}"),
                ),
                0.8,
                ref="town_ent",
            ),
        ),
        texts={
            (True, True): "The {name} is {type:a} held every {month} in {town}.",
            (True, False): "The {name} is {type:a} held every {month}.",
            (False, True): "The {name} is {type:a} held in {town}.",
            (False, False): "The {name} is {type:a}.",
        },
    ),
    body=(
        Line(
            "It was first held in {first}, and it has taken place almost every year since.",
            Fact(
                "first",
                "In which year was the {name} first held?",
                "The {name} was first held in {v}.",
                other_year,
            ),
        ),
        Line(
            "The festival lasts {days} days, with events in the streets and the main square.",
            Fact(
                "days",
                "How many days does the {name} last?",
                "The {name} lasts {v} days.",
                other_in(tuple(str(x) for x in range(2, 10))),
                answers=num("days"),
            ),
        ),
        Line(
            "The traditional dish of the {name} is {dish}.",
            Fact(
                "dish",
                "What is the traditional dish of the {name}?",
                "The traditional dish of the {name} is {v}.",
                other_in(V.DISHES),
            ),
        ),
        Line(
            "Dancers at the festival wear {masks} masks during the evening parade.",
            Fact(
                "masks",
                "What colour are the masks worn by dancers at the {name}?",
                "Dancers at the {name} wear {v} masks.",
                other_in(V.COLOURS),
            ),
        ),
        Line(
            "It is organised by the {organiser.title}.",
            Fact(
                "organiser",
                "Which organisation organises the {name}?",
                "The {name} is organised by the {v}.",
                fresh_word("stem", " {organiser.attrs[word]}"),
                answers=("{organiser.title}",),
            ),
            refs=("organiser",),
            when="organiser",
            preferred=True,
        ),
        Line(
            "About {visitors:,} visitors come to the {name} each year.",
            Fact(
                "visitors",
                "About how many visitors come to the {name} each year?",
                "About {v} visitors come to the {name} each year.",
                other_number,
                answers=("{visitors:,}",),
            ),
        ),
    ),
)
