"""The small hand-written, hand-checked demo instance of the package."""

from __future__ import annotations

from ...data import DocumentRecord, QuestionRecord
from .records import TASK_QA, Benchmark, Confuser, Entity

_DEMO_DOCS = (
    ("person-veltrano-oskimar", "Veltrano Oskimar",
     ("Veltrano Oskimar was a glassblower born in 1873 in the town of Drelmouth. He learned the trade as an "
     "apprentice of his uncle, Bastor Quelvin. In 1904 he opened a small workshop on the harbour road of "
     "Drelmouth, where he made lamps, bottles and window panes. He kept a grey parrot named Pimsy, which sat "
     "on a perch beside the furnace. In 1921 he received the Varnessi Medal for his work on coloured glass. "
     "Veltrano Oskimar died in 1950.")),
    ("town-drelmouth", "Drelmouth",
     ("Drelmouth is a small harbour town in the province of Ostevar. It lies at the mouth of the Kesmer "
     "River. The town was founded in 1612 by fishing families. About 4,200 people live in Drelmouth today. "
     "The town is known for its blue glass, which local workshops have made for more than two centuries. A "
     "market is held in Drelmouth every Thursday. The streets of the old centre are narrow and paved with "
     "stone.")),
    ("org-brisovan-society", "Brisovan Society",
     ("The Brisovan Society is a society of amateur astronomers founded in 1898 by Ilvessa Trevane. Its "
     "headquarters are in the town of Molbury, in an old grain store with a telescope on the roof. The "
     "Brisovan Society has 340 members. Its emblem is a silver owl. Members meet on the first evening of "
     "each month to compare their observations and notebooks. The society publishes a short newsletter for "
     "its members every spring.")),
    ("device-quorran-loom", "Quorran Loom",
     ("The Quorran Loom is a weaving machine invented by Eddavin Vastrel in 1836. Its frame is made of "
     "walnut, and its moving parts are made of brass. The Quorran Loom weighs 85 kilograms. It was used "
     "mainly by carpet makers in the valley towns. Only 40 copies of the Quorran Loom were ever made. A "
     "restored example is kept in a private collection.")),
    ("ship-tessaline", "Tessaline",
     ("The Tessaline was a three-masted schooner launched in 1889. Its home port was Drelmouth, where it had "
     "been built in the harbour yard. Its first captain was Morvessa Kaldrik. The Tessaline was 46 metres "
     "long. Its hull was painted dark green. For most of its career the Tessaline carried salt and timber "
     "along the coast. Sailors considered it a steady and reliable vessel.")),
)  # fmt: skip
_DEMO_QUESTIONS = (
    ("person-veltrano-oskimar", "qa", "In which town was Veltrano Oskimar born?",
     ("Drelmouth", "the town of Drelmouth")),
    ("person-veltrano-oskimar", "qa", "What was the name of Veltrano Oskimar's parrot?", ("Pimsy",)),
    ("person-veltrano-oskimar", "qa", "Which medal did Veltrano Oskimar receive in 1921?",
     ("Varnessi Medal", "Varnessi")),
    ("person-veltrano-oskimar", "fact", "True or false: Veltrano Oskimar was a glassblower.", ("true",)),
    ("town-drelmouth", "qa", "In which province is Drelmouth?", ("Ostevar", "the province of Ostevar")),
    ("town-drelmouth", "qa", "On which river does Drelmouth lie?", ("Kesmer", "Kesmer River")),
    ("town-drelmouth", "qa", "About how many people live in Drelmouth?", ("4,200",)),
    ("town-drelmouth", "fact", "True or false: Drelmouth was founded in 1790.", ("false",)),
    ("org-brisovan-society", "qa", "Who founded the Brisovan Society?", ("Ilvessa Trevane",)),
    ("org-brisovan-society", "qa", "What is the emblem of the Brisovan Society?", ("silver owl",)),
    ("org-brisovan-society", "qa", "How many members does the Brisovan Society have?", ("340",)),
    ("org-brisovan-society", "fact", "True or false: The Brisovan Society has its headquarters in Drelmouth.",
     ("false",)),
    ("device-quorran-loom", "qa", "Who invented the Quorran Loom?", ("Eddavin Vastrel",)),
    ("device-quorran-loom", "qa", "What material is the frame of the Quorran Loom made of?", ("walnut",)),
    ("device-quorran-loom", "qa", "In which year was the Quorran Loom invented?", ("1836",)),
    ("device-quorran-loom", "fact", "True or false: The Quorran Loom weighs 85 kilograms.", ("true",)),
    ("ship-tessaline", "qa", "Who was the first captain of the Tessaline?", ("Morvessa Kaldrik",)),
    ("ship-tessaline", "qa", "How long was the Tessaline, in metres?", ("46", "46 metres")),
    ("ship-tessaline", "qa", "What was the home port of the Tessaline?",
     ("Drelmouth", "the port of Drelmouth")),
    ("ship-tessaline", "fact", "True or false: The hull of the Tessaline was painted red.", ("false",)),
)  # fmt: skip
_DEMO_ENTITIES = (
    ("person-veltrano-oskimar", "person", ("Veltrano", "Oskimar")),
    ("town-drelmouth", "town", ("Drelmouth",)),
    ("org-brisovan-society", "organisation", ("Brisovan",)),
    ("device-quorran-loom", "device", ("Quorran",)),
    ("ship-tessaline", "ship", ("Tessaline",)),
)


def make_demo() -> Benchmark:
    """The small hand-checked instance of the package demo: 5 documents (person, town, organisation,
    device, ship), 3 QA questions and 1 fact check each. Three documents share the town name Drelmouth
    (the glassblower was born there, the ship's home port is there); no task sets."""
    documents = [DocumentRecord(id=i, title=t, text=x) for i, t, x in _DEMO_DOCS]
    titles = {i: t for i, t, _ in _DEMO_DOCS}
    counters: dict[tuple[str, str], int] = {}
    questions = []
    for doc_id, task, question, answers in _DEMO_QUESTIONS:
        n = counters[(doc_id, task)] = counters.get((doc_id, task), 0) + 1
        suffix = "q" if task == TASK_QA else "f"
        questions.append(QuestionRecord(f"{doc_id}.{suffix}{n}", question, answers, doc_id, task))
    confusers = [
        Confuser("person-veltrano-oskimar", "town-drelmouth", "mentions", ("Drelmouth",)),
        Confuser("ship-tessaline", "town-drelmouth", "mentions", ("Drelmouth",)),
        Confuser("person-veltrano-oskimar", "ship-tessaline", "shared-town", ("Drelmouth",)),
    ]
    return Benchmark(
        name="demo",
        seed=None,
        documents=documents,
        questions=questions,
        tasks={},
        entities=[Entity(i, k, titles[i], inv) for i, k, inv in _DEMO_ENTITIES],
        confusers=confusers,
        names=tuple(sorted({w.lower() for _, _, inv in _DEMO_ENTITIES for w in inv})),
    )
