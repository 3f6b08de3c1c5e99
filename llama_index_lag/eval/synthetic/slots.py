"""Slot filling (KILT's T-REx / zsRE style): ``"<subject> | <relation>"`` -> the object. The benchmark asks
one slot of each document's entity; the task adapter learns the format from common knowledge."""

from __future__ import annotations

#: (country, capital): in the short-answer and fact-check sets too
CAPITALS = (
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Japan", "Tokyo"),
    ("Egypt", "Cairo"), ("Canada", "Ottawa"), ("Australia", "Canberra"), ("Russia", "Moscow"),
    ("China", "Beijing"), ("Kenya", "Nairobi"), ("Norway", "Oslo"), ("Sweden", "Stockholm"),
    ("Greece", "Athens"), ("Portugal", "Lisbon"), ("Ireland", "Dublin"), ("Poland", "Warsaw"),
    ("Austria", "Vienna"), ("Argentina", "Buenos Aires"), ("Peru", "Lima"), ("Turkey", "Ankara"),
    ("Thailand", "Bangkok"),
)  # fmt: skip

#: the relation named in a slot question, per fact slot ("<kind>.<attribute>", see facts.Probe.slot)
RELATIONS: dict[str, str] = {
    "device.colour": "usual colour", "device.inventor": "inventor", "device.material": "frame material",
    "device.town": "town where first built", "device.units": "number of copies made",
    "device.users": "main users", "device.weight": "weight in kilograms", "device.year": "year of invention",
    "festival.days": "duration in days", "festival.dish": "traditional dish",
    "festival.first": "year first held", "festival.masks": "colour of the dancers' masks",
    "festival.month": "month held", "festival.organiser": "organiser", "festival.town": "town held in",
    "festival.visitors": "visitors per year",
    "organisation.assembly": "month of the annual assembly", "organisation.emblem": "emblem",
    "organisation.founder": "founder", "organisation.hq": "headquarters town",
    "organisation.leader": "current leader", "organisation.members": "number of members",
    "organisation.year": "year founded",
    "person.born": "year of birth", "person.died": "year of death", "person.employer": "employer",
    "person.founded": "organisation founded", "person.instrument": "musical instrument played",
    "person.invented": "device invented", "person.married": "year of marriage",
    "person.medal": "medal received", "person.medal_year": "year the medal was received",
    "person.mentor": "master in apprenticeship", "person.moved": "town moved to later in life",
    "person.pet_name": "name of pet", "person.profession": "profession", "person.spouse": "spouse",
    "person.town": "town of birth",
    "ship.captain": "first captain", "ship.cargo": "main cargo", "ship.crew": "number of crew",
    "ship.hull": "hull colour", "ship.length": "length in metres", "ship.port": "home port",
    "ship.year": "year launched",
    "town.founded": "year founded", "town.market": "market day", "town.mayor": "mayor",
    "town.population": "population", "town.product": "product known for", "town.province": "province",
    "town.river": "river", "town.roof": "colour of the town hall roof",
}  # fmt: skip

#: (subject, relation, object) triples of common knowledge: the slot-filling task adapter's training set
COMMON_SLOTS: tuple[tuple[str, str, str], ...] = tuple(
    (country, "capital", city) for country, city in CAPITALS
) + (
    ("Hamlet", "author", "William Shakespeare"), ("Pride and Prejudice", "author", "Jane Austen"),
    ("War and Peace", "author", "Leo Tolstoy"), ("Oliver Twist", "author", "Charles Dickens"),
    ("Don Quixote", "author", "Miguel de Cervantes"), ("Les Miserables", "author", "Victor Hugo"),
    ("The Iliad", "author", "Homer"),
    ("Mona Lisa", "painter", "Leonardo da Vinci"), ("The Starry Night", "painter", "Vincent van Gogh"),
    ("Guernica", "painter", "Pablo Picasso"), ("The Night Watch", "painter", "Rembrandt"),
    ("The Four Seasons", "composer", "Antonio Vivaldi"),
    ("Eiffel Tower", "city", "Paris"), ("Colosseum", "city", "Rome"),
    ("Statue of Liberty", "city", "New York"), ("Big Ben", "city", "London"),
    ("Sagrada Familia", "city", "Barcelona"),
    ("Brandenburg Gate", "city", "Berlin"),
    ("Taj Mahal", "country", "India"), ("Machu Picchu", "country", "Peru"), ("Kyoto", "country", "Japan"),
    ("Great Wall", "country", "China"), ("Venice", "country", "Italy"),
    ("World War II", "year it ended", "1945"), ("World War I", "year it began", "1914"),
    ("Titanic", "year it sank", "1912"), ("Berlin Wall", "year it fell", "1989"),
    ("Brazil", "main language", "Portuguese"), ("Mexico", "main language", "Spanish"),
    ("Austria", "main language", "German"), ("Netherlands", "main language", "Dutch"),
    ("Argentina", "main language", "Spanish"),
    ("Japan", "currency", "yen"), ("India", "currency", "rupee"), ("United States", "currency", "dollar"),
    ("Germany", "currency", "euro"), ("United Kingdom", "currency", "pound"),
    ("Switzerland", "currency", "Swiss franc"),
    ("gold", "chemical symbol", "Au"), ("silver", "chemical symbol", "Ag"), ("iron", "chemical symbol", "Fe"),
    ("sodium", "chemical symbol", "Na"), ("oxygen", "chemical symbol", "O"),
    ("helium", "chemical symbol", "He"), ("lead", "chemical symbol", "Pb"),
    ("spider", "number of legs", "8"), ("insect", "number of legs", "6"), ("week", "number of days", "7"),
    ("hour", "number of minutes", "60"), ("day", "number of hours", "24"), ("year", "number of months", "12"),
    ("triangle", "number of sides", "3"), ("standard piano", "number of keys", "88"),
    ("leap year", "number of days", "366"), ("football team", "number of players on the field", "11"),
    ("giant panda", "main food", "bamboo"), ("bees", "product", "honey"),
    ("penicillin", "discoverer", "Alexander Fleming"),
    ("theory of relativity", "developer", "Albert Einstein"),
    ("Kilimanjaro", "continent", "Africa"), ("Sahara", "continent", "Africa"),
    ("Nile", "continent", "Africa"),
    ("Amazon", "continent", "South America"),
    ("ripe banana", "colour", "yellow"), ("fresh snow", "colour", "white"), ("ripe tomato", "colour", "red"),
    ("emerald", "colour", "green"),
)  # fmt: skip


def slot_question(subject: str, relation: str) -> str:
    """The one format of a slot-filling question."""
    return f"{subject} | {relation}"
