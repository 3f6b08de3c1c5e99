"""The pools that attribute values are drawn from, and the filler sentences (no facts) of each kind.

Every word here is reserved: no invented name may equal one (see :func:`.names.reserved_words`).
"""

PROFESSIONS = (
    "glassblower", "clockmaker", "cartographer", "bookbinder", "beekeeper", "shipwright", "violin maker",
    "stonemason", "botanist", "astronomer", "printer", "potter", "blacksmith", "weaver", "surveyor",
    "lighthouse keeper", "apothecary", "engraver", "bell founder", "tailor", "brewer", "schoolteacher",
    "architect", "photographer", "chemist", "rope maker", "miller", "tanner", "jeweller", "carpenter",
)  # fmt: skip
PETS = ("dog", "cat", "parrot", "goat", "tortoise", "raven", "pony", "ferret", "donkey", "canary")
INSTRUMENTS = (
    "violin", "cello", "harp", "flute", "accordion", "trumpet", "oboe", "lute", "clarinet", "piano",
    "mandolin", "bassoon",
)  # fmt: skip
COLOURS = ("red", "blue", "green", "yellow", "white", "black", "grey", "orange", "purple", "brown")
EMBLEM_COLOURS = ("silver", "golden", "red", "blue", "green", "black", "white")
EMBLEM_ANIMALS = ("heron", "fox", "owl", "stag", "hare", "swan", "wolf", "bear", "falcon", "otter", "boar")
MATERIALS = (
    "brass",
    "oak",
    "copper",
    "iron",
    "walnut",
    "bronze",
    "tin",
    "steel",
    "pewter",
    "birch",
    "maple",
)
PRODUCTS = (
    "salt", "wool", "cheese", "paper", "rope", "glass", "honey", "cider", "pottery", "timber", "lace",
    "candles", "soap", "ink", "barley", "linen", "leather",
)  # fmt: skip
WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
MONTHS = (
    "January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
    "November", "December",
)  # fmt: skip
TOWN_SIZES = ("small", "quiet", "old", "busy", "hillside", "market")
ORG_TYPES = (
    ("Guild", "guild of clockmakers"), ("Guild", "guild of weavers"), ("Guild", "guild of stonemasons"),
    ("Society", "society of amateur astronomers"), ("Society", "botanical society"),
    ("Society", "historical society"), ("Company", "shipping company"), ("Company", "trading company"),
    ("Club", "rowing club"), ("Club", "chess club"), ("Academy", "music academy"),
    ("Institute", "research institute"), ("Library", "lending library"), ("Bank", "savings bank"),
)  # fmt: skip
DEVICE_TYPES = (
    ("Engine", "machine"), ("Lamp", "device"), ("Lens", "instrument"), ("Pump", "machine"),
    ("Gauge", "instrument"), ("Clock", "device"), ("Compass", "instrument"), ("Press", "machine"),
    ("Drill", "tool"), ("Winch", "machine"), ("Bellows", "device"), ("Kettle", "device"),
)  # fmt: skip
DEVICE_WEIGHTS = {  # plausible weight range in kilograms per kind word
    "Engine": (60, 900), "Lamp": (2, 30), "Lens": (2, 25), "Pump": (20, 300), "Gauge": (2, 20),
    "Clock": (5, 400), "Compass": (2, 12), "Press": (80, 900), "Drill": (3, 60), "Winch": (20, 400),
    "Bellows": (5, 80), "Kettle": (2, 40),
}  # fmt: skip
DEVICE_USERS = (
    ("millers", "miller"), ("lighthouse keepers", "lighthouse keeper"), ("beekeepers", "beekeeper"),
    ("miners", "miner"), ("fishermen", "fisherman"), ("bakers", "baker"), ("surveyors", "surveyor"),
    ("printers", "printer"), ("weavers", "weaver"), ("brewers", "brewer"), ("farmers", "farmer"),
    ("sailors", "sailor"), ("dyers", "dyer"),
)  # fmt: skip
SHIP_TYPES = (
    "schooner", "steamship", "ferry", "fishing trawler", "paddle steamer", "cargo barge", "whaling ship",
    "brigantine", "tugboat", "sailing barge",
)  # fmt: skip
CARGOES = (
    "timber",
    "coal",
    "grain",
    "wool",
    "salt",
    "tea",
    "passengers",
    "mail",
    "marble",
    "iron ore",
    "wine",
)
FESTIVAL_TYPES = (
    "lantern festival", "harvest festival", "music festival", "kite festival", "boat festival",
    "bread festival", "flower festival", "fire festival", "dance festival", "puppet festival",
)  # fmt: skip
DISHES = (
    "plum dumplings", "roast chestnuts", "barley soup", "honey cakes", "fried trout", "onion pie",
    "rye bread", "smoked eel", "apple fritters", "lentil stew", "cabbage rolls", "pear tart",
)  # fmt: skip
NUMBER_WORDS = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
    "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty",
)  # fmt: skip

FILLERS = {
    "person": (
        "{Short} was known for a careful and patient way of working.",
        "Neighbours remembered {obj} as quiet and generous.",
        "{Pr} kept detailed notebooks about every project.",
        "{Pr} enjoyed long walks in the countryside on Sunday afternoons.",
        "Several of {poss} letters have survived in private collections.",
        "Friends described {Short} as cheerful, curious and rather stubborn.",
        "{Pr} often worked late into the evening by candlelight.",
    ),
    "town": (
        "The streets of the old centre are narrow and paved with stone.",
        "Many of the houses in {T} date from the nineteenth century.",
        "A small museum in {T} describes the history of the area.",
        "The surrounding countryside is mostly farmland and low hills.",
        "Visitors often remark on the quiet of its evenings.",
        "A stone bridge and an old chapel are the best known sights of {T}.",
    ),
    "organisation": (
        "Its members meet regularly to share their work and plans.",
        "The {T} keeps a small archive of letters and records.",
        "New members are admitted after a short interview.",
        "The {T} publishes a short newsletter for its members.",
        "Over the years the {T} has moved between several buildings.",
    ),
    "device": (
        "Early versions were difficult to repair.",
        "A restored example of the {T} is kept in a private collection.",
        "Later models were smaller and cheaper to build.",
        "Its design was copied by several rival workshops.",
        "Owners of the {T} praised its simple controls.",
    ),
    "ship": (
        "The ship was repaired several times during its long career.",
        "Sailors considered the {T} a steady and reliable vessel.",
        "A painting of the ship hangs in a harbour tavern.",
        "Its deck was rebuilt after a winter storm.",
        "The {T} was a familiar sight along the coast.",
    ),
    "festival": (
        "Families travel from nearby villages to take part.",
        "The celebrations end with music in the main square.",
        "Local children prepare decorations weeks in advance.",
        "Stalls sell food and handmade goods along the streets.",
        "Many visitors return to the {T} year after year.",
    ),
}
