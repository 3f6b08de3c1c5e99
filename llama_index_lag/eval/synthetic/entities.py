"""The kinds of entities, one table row each: the fact specs their documents are written from
(:mod:`.people`, :mod:`.things`), the prefix of their document ids, and the attributes a deliberate
look-alike (a confuser) shares with the entity it resembles."""

from __future__ import annotations

from .facts import KindSpec
from .people import PERSON, TOWN
from .things import DEVICE, FESTIVAL, ORGANISATION, SHIP

SPECS: dict[str, KindSpec] = {
    "person": PERSON,
    "town": TOWN,
    "organisation": ORGANISATION,
    "device": DEVICE,
    "ship": SHIP,
    "festival": FESTIVAL,
}

ID_PREFIX = {
    "person": "person",
    "town": "town",
    "organisation": "org",
    "device": "device",
    "ship": "ship",
    "festival": "festival",
}

PARTNER_SHARED = {
    "person": ("surname", "profession", "town"),
    "town": ("stem", "province"),
    "organisation": ("word", "hq"),
    "device": ("word", "material"),
    "ship": ("type", "port"),
    "festival": ("type", "town"),
}
"""The attributes a confuser may share with its partner; those stated in both texts are the pair's
``shared`` strings."""
