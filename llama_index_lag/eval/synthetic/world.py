"""The world model: every entity of one benchmark and its attributes, drawn before any text is written so
that cross-references (a person's employer, a ship's home port) agree between documents."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ...errors import ConfigError
from . import vocabulary as V
from .names import NameMaker
from .records import KINDS

_KIND_SHARE = {
    "person": 0.30,
    "town": 0.20,
    "organisation": 0.15,
    "device": 0.12,
    "ship": 0.12,
    "festival": 0.11,
}
_CONFUSER_P = {
    "person": 0.35,
    "town": 0.2,
    "organisation": 0.35,
    "device": 0.35,
    "ship": 0.35,
    "festival": 0.35,
}


@dataclass
class WorldEntity:
    """One entity of the world: kind, title, invented name words and attributes; ``partner`` is an earlier
    entity of the same kind it deliberately resembles (a confuser)."""

    kind: str
    title: str
    invented: tuple[str, ...]
    attrs: dict[str, Any] = field(default_factory=dict)
    doc_id: str = ""
    partner: WorldEntity | None = None
    partner_reason: str = ""
    refs: list[WorldEntity] = field(default_factory=list)  # mentioned entities with their own document


def _entity(kind: str, title: str, invented: tuple[str, ...], partner: WorldEntity | None,
            reason: str) -> WorldEntity:
    """A new entity; ``reason`` says how it resembles ``partner`` (kept only when there is one)."""
    return WorldEntity(kind, title, invented, partner=partner, partner_reason=reason if partner else "")


def _kind_counts(n: int) -> dict[str, int]:
    """How many entities of each kind ``n`` documents have (the shares, rounded by largest remainder)."""
    raw = {k: n * _KIND_SHARE[k] for k in KINDS}
    counts = {k: int(v) for k, v in raw.items()}
    rest = n - sum(counts.values())
    for k in sorted(KINDS, key=lambda k: (-(raw[k] - counts[k]), KINDS.index(k)))[:rest]:
        counts[k] += 1
    return counts


class World:
    """All entities of one benchmark, built before any text is written so cross-references agree."""

    def __init__(self, n_docs: int, rng: random.Random, names: NameMaker) -> None:
        self.rng = rng
        self.names = names
        self.counts = _kind_counts(n_docs)
        self.by_kind: dict[str, list[WorldEntity]] = {k: [] for k in KINDS}
        self.background_towns = [names.town()[0] for _ in range(max(3, n_docs // 8))]
        self.provinces = [names.word("province") for _ in range(max(2, self.counts["town"] // 3))]
        self._build()

    # -- helpers --
    def fresh_person(self) -> str:
        """A fresh full name of a person without a document."""
        given, surname = self.names.person()
        return f"{given} {surname}"

    def pick_town(self, p_entity: float = 0.7) -> tuple[str, WorldEntity | None]:
        """A town of the benchmark (with probability ``p_entity``, if any) or a background town, and its
        entity (``None`` for a background town)."""
        towns = self.by_kind["town"]
        if towns and self.rng.random() < p_entity:
            t = self.rng.choice(towns)
            return t.title, t
        return self.rng.choice(self.background_towns), None

    def partner_for(self, kind: str) -> WorldEntity | None:
        """An earlier entity of ``kind`` for the next one to resemble, or ``None``."""
        pool = self.by_kind[kind]
        if pool and self.rng.random() < _CONFUSER_P[kind]:
            return self.rng.choice(pool)
        return None

    # -- entities --
    def _build(self) -> None:
        """Draw every entity, kind by kind."""
        # the order of the steps is part of the RNG sequence: do not reorder
        self._build_towns()
        self._build_people()
        self._build_organisations()
        self._assign_employers()
        self._build_devices()
        self._build_ships()
        self._build_festivals()

    def _build_towns(self) -> None:
        """Towns first: everything else may refer to them."""
        rng = self.rng
        for _ in range(self.counts["town"]):
            partner = self.partner_for("town")
            name = stem = None
            if partner is not None:
                try:
                    name, stem = self.names.town(partner.attrs["stem"])
                except ConfigError:
                    partner = None
            if name is None:
                name, stem = self.names.town()
            e = _entity("town", name, (name,), partner, "name-stem")
            e.attrs = {
                "stem": stem,
                "size": rng.choice(V.TOWN_SIZES),
                "province": partner.attrs["province"] if partner else rng.choice(self.provinces),
                "river": self.names.word("river"),
                "founded": rng.randint(900, 1750),
                "population": rng.randint(8, 600) * 100,
                "product": rng.choice(V.PRODUCTS),
                "roof": rng.choice(V.COLOURS),
                "mayor": self.fresh_person(),
                "market": rng.choice(V.WEEKDAYS),
            }
            self.by_kind["town"].append(e)

    def _build_people(self) -> None:
        """People, each born in a town and possibly sharing a surname with an earlier one."""
        rng = self.rng
        for _ in range(self.counts["person"]):
            partner = self.partner_for("person")
            given, surname = self.names.person(partner.attrs["surname"] if partner else None)
            born = rng.randint(1780, 1950)
            town, town_ent = self.pick_town()
            profession = rng.choice(V.PROFESSIONS)
            if partner is not None:
                if rng.random() < 0.5:
                    profession = partner.attrs["profession"]
                else:
                    town, town_ent = partner.attrs["town"], partner.attrs["town_ent"]
            moved, moved_ent = self.pick_town()
            while moved == town:
                moved, moved_ent = self.pick_town()
            died = born + rng.randint(55, 92)
            e = _entity("person", f"{given} {surname}", (given, surname), partner, "surname")
            e.attrs = {
                "given": given,
                "surname": surname,
                "he": rng.random() < 0.5,
                "profession": profession,
                "born": born,
                "town": town,
                "town_ent": town_ent,
                "mentor": self.fresh_person(),
                "spouse": self.fresh_person(),
                "married": born + rng.randint(20, 40),
                "pet": rng.choice(V.PETS),
                "pet_name": self.names.word("pet"),
                "instrument": rng.choice(V.INSTRUMENTS),
                "medal": self.names.word("stem"),
                "medal_year": born + rng.randint(25, 50),
                "moved": moved,
                "moved_ent": moved_ent,
                "died": died if died <= 2015 else None,
                "employer": None,
                "founded": None,
                "invented": None,
            }
            self.by_kind["person"].append(e)

    def _build_organisations(self) -> None:
        """Organisations, founded by a person of the benchmark or a fresh name."""
        rng = self.rng
        for _ in range(self.counts["organisation"]):
            partner = self.partner_for("organisation")
            word, desc = rng.choice(V.ORG_TYPES)
            if partner is not None:
                word, desc = partner.attrs["word"], partner.attrs["desc"]
            stem = self.names.word("stem")
            founder, founder_ent, year = self._maker("founded", 1760, 2000)
            hq, hq_ent = (partner.attrs["hq"], partner.attrs["hq_ent"]) if partner else self.pick_town()
            e = _entity("organisation", f"{stem} {word}", (stem,), partner, "kind-word")
            e.attrs = {
                "word": word,
                "desc": desc,
                "founder": founder,
                "founder_ent": founder_ent,
                "year": year,
                "hq": hq,
                "hq_ent": hq_ent,
                "members": rng.randint(12, 950),
                "emblem": f"{rng.choice(V.EMBLEM_COLOURS)} {rng.choice(V.EMBLEM_ANIMALS)}",
                "assembly": rng.choice(V.MONTHS),
                "leader": self.fresh_person(),
            }
            if founder_ent is not None:
                founder_ent.attrs["founded"] = e
            self.by_kind["organisation"].append(e)

    def _assign_employers(self) -> None:
        """Give about half of the people an employer among the organisations."""
        rng = self.rng
        orgs = self.by_kind["organisation"]
        for p in self.by_kind["person"]:
            options = [
                o for o in orgs if o is not p.attrs["founded"] and o.attrs["year"] <= p.attrs["born"] + 40
            ]
            if options and rng.random() < 0.5:
                p.attrs["employer"] = rng.choice(options)

    def _build_devices(self) -> None:
        """Devices, invented by a person of the benchmark or a fresh name."""
        rng = self.rng
        for _ in range(self.counts["device"]):
            partner = self.partner_for("device")
            if partner is not None:
                word, desc = partner.attrs["word"], partner.attrs["desc"]
            else:
                word, desc = rng.choice(V.DEVICE_TYPES)
            stem = self.names.word("stem")
            inventor, inventor_ent, year = self._maker("invented", 1760, 1990)
            town, town_ent = self.pick_town()
            e = _entity("device", f"{stem} {word}", (stem,), partner, "kind-word")
            e.attrs = {
                "word": word,
                "desc": desc,
                "inventor": inventor,
                "inventor_ent": inventor_ent,
                "year": year,
                "material": partner.attrs["material"] if partner else rng.choice(V.MATERIALS),
                "weight": rng.randint(*V.DEVICE_WEIGHTS[word]),
                "users": rng.choice(V.DEVICE_USERS),
                "town": town,
                "town_ent": town_ent,
                "units": rng.randint(3, 90),
                "colour": rng.choice(V.COLOURS),
            }
            if inventor_ent is not None:
                inventor_ent.attrs["invented"] = e
            self.by_kind["device"].append(e)

    def _build_ships(self) -> None:
        """Ships, sometimes built by a company of the benchmark."""
        rng = self.rng
        orgs = self.by_kind["organisation"]
        companies = [o for o in orgs if o.attrs["word"] == "Company"]
        for _ in range(self.counts["ship"]):
            partner = self.partner_for("ship")
            name = self.names.word("ship")
            port, port_ent = (
                (partner.attrs["port"], partner.attrs["port_ent"]) if partner else self.pick_town()
            )
            year = rng.randint(1800, 1990)
            builders = [o for o in companies if o.attrs["year"] < year]
            builder = rng.choice(builders) if builders and rng.random() < 0.5 else None
            e = _entity("ship", name, (name,), partner, "kind-word")
            e.attrs = {
                "type": partner.attrs["type"] if partner else rng.choice(V.SHIP_TYPES),
                "year": year,
                "port": port,
                "port_ent": port_ent,
                "captain": self.fresh_person(),
                "length": rng.randint(14, 90),
                "hull": rng.choice(V.COLOURS),
                "cargo": rng.choice(V.CARGOES),
                "crew": rng.randint(4, 60),
                "builder": builder,
            }
            self.by_kind["ship"].append(e)

    def _build_festivals(self) -> None:
        """Festivals, sometimes organised by an organisation of the benchmark."""
        rng = self.rng
        orgs = self.by_kind["organisation"]
        for _ in range(self.counts["festival"]):
            partner = self.partner_for("festival")
            stem = self.names.word("stem")
            town, town_ent = (
                (partner.attrs["town"], partner.attrs["town_ent"]) if partner else self.pick_town()
            )
            organiser = rng.choice(orgs) if orgs and rng.random() < 0.4 else None
            e = _entity("festival", f"{stem} Festival", (stem,), partner, "kind-word")
            e.attrs = {
                "type": partner.attrs["type"] if partner else rng.choice(V.FESTIVAL_TYPES),
                "month": rng.choice(V.MONTHS),
                "town": town,
                "town_ent": town_ent,
                "first": rng.randint(1760, 1995),
                "days": rng.randint(2, 9),
                "dish": rng.choice(V.DISHES),
                "masks": rng.choice(V.COLOURS),
                "organiser": organiser,
                "visitors": rng.randint(5, 400) * 100,
            }
            self.by_kind["festival"].append(e)

    def _maker(self, role: str, lo: int, hi: int) -> tuple[str, WorldEntity | None, int]:
        """A founder / inventor: a person of the benchmark (once per role) or a fresh name, and a year."""
        free = [p for p in self.by_kind["person"] if p.attrs[role] is None]
        if free and self.rng.random() < 0.6:
            p = self.rng.choice(free)
            year = p.attrs["born"] + self.rng.randint(25, 50)
            return p.title, p, year
        return self.fresh_person(), None, self.rng.randint(lo, hi)

    # -- fallbacks for false claims when no other entity of the kind has a different value --
    def fake_town(self, value: str) -> Callable[[random.Random], str]:
        """Another town of the world than ``value``."""
        towns = [t.title for t in self.by_kind["town"]] + self.background_towns
        return lambda r: r.choice([t for t in towns if t != value])

    def fake_person(self) -> Callable[[random.Random], str]:
        """A fresh person's name."""
        return lambda r: self.fresh_person()

    def fake_word(self, pattern: str, suffix: str = "") -> Callable[[random.Random], str]:
        """A fresh word of ``pattern`` followed by ``suffix``."""
        return lambda r: self.names.word(pattern) + suffix
