"""The task-adapter training sets: true/false claims and terse answers built from common knowledge; they
never mention a benchmark entity and do not depend on the seed."""

from __future__ import annotations

import random

from ...data import TaskExample
from .slots import CAPITALS, COMMON_SLOTS, slot_question

# (swap group, claim template with {} for the value, question, answer). False claims put in the answer of
# another fact of the same group.
_COMMON_FACTS: tuple[tuple[str, str, str, str], ...] = tuple(
    ("capital", f"The capital of {country} is {{}}.", f"What is the capital of {country}?", city)
    for country, city in CAPITALS
) + (
    ("planet", "{} is the largest planet in the Solar System.",
     "Which planet is the largest in the Solar System?", "Jupiter"),
    ("planet", "{} is the planet closest to the Sun.", "Which planet is closest to the Sun?", "Mercury"),
    ("planet", "{} is known as the Red Planet.", "Which planet is known as the Red Planet?", "Mars"),
    ("planet", "{} is the planet we live on.", "Which planet do we live on?", "Earth"),
    ("planet", "{} is the hottest planet in the Solar System.",
     "Which planet is the hottest in the Solar System?", "Venus"),
    ("planet", "{} is the planet farthest from the Sun.",
     "Which planet is farthest from the Sun?", "Neptune"),
    ("symbol", "The chemical symbol for gold is {}.", "What is the chemical symbol for gold?", "Au"),
    ("symbol", "The chemical symbol for silver is {}.", "What is the chemical symbol for silver?", "Ag"),
    ("symbol", "The chemical symbol for iron is {}.", "What is the chemical symbol for iron?", "Fe"),
    ("symbol", "The chemical symbol for sodium is {}.", "What is the chemical symbol for sodium?", "Na"),
    ("symbol", "The chemical symbol for oxygen is {}.", "What is the chemical symbol for oxygen?", "O"),
    ("symbol", "The chemical symbol for helium is {}.", "What is the chemical symbol for helium?", "He"),
    ("symbol", "The chemical symbol for lead is {}.", "What is the chemical symbol for lead?", "Pb"),
    ("animal", "The tallest animal in the world is the {}.",
     "What is the tallest animal in the world?", "giraffe"),
    ("animal", "The fastest land animal is the {}.", "What is the fastest land animal?", "cheetah"),
    ("animal", "The largest animal on Earth is the {}.",
     "What is the largest animal on Earth?", "blue whale"),
    ("animal", "The only mammal that can truly fly is the {}.", "Which mammal can truly fly?", "bat"),
    ("animal", "The flightless bird that lives in Antarctica is the {}.",
     "Which flightless bird lives in Antarctica?", "penguin"),
    ("animal", "The black and white bear that eats bamboo is the {}.",
     "Which black and white bear eats bamboo?", "giant panda"),
    ("animal", "The animal that stores fat in its hump is the {}.",
     "Which animal stores fat in its hump?", "camel"),
    ("animal", "The animal that carries its young in a pouch and lives in Australia is the {}.",
     "Which Australian animal carries its young in a pouch?", "kangaroo"),
    ("number", "A spider has {} legs.", "How many legs does a spider have?", "8"),
    ("number", "A week has {} days.", "How many days are in a week?", "7"),
    ("number", "An insect has {} legs.", "How many legs does an insect have?", "6"),
    ("number", "An hour has {} minutes.", "How many minutes are in an hour?", "60"),
    ("number", "A day has {} hours.", "How many hours are in a day?", "24"),
    ("number", "A year has {} months.", "How many months are in a year?", "12"),
    ("number", "A triangle has {} sides.", "How many sides does a triangle have?", "3"),
    ("number", "A right angle measures {} degrees.", "How many degrees are in a right angle?", "90"),
    ("number", "At sea level water boils at {} degrees Celsius.",
     "At how many degrees Celsius does water boil at sea level?", "100"),
    ("number", "A standard piano has {} keys.", "How many keys does a standard piano have?", "88"),
    ("number", "There are {} planets in the Solar System.", "How many planets are in the Solar System?", "8"),
    ("number", "A football team has {} players on the field.",
     "How many players does a football team have on the field?", "11"),
    ("number", "A leap year has {} days.", "How many days does a leap year have?", "366"),
    ("gas", "Plants take in {} from the air to make food.",
     "Which gas do plants take in from the air to make food?", "carbon dioxide"),
    ("gas", "The gas humans need to breathe in to live is {}.",
     "Which gas do humans need to breathe in to live?", "oxygen"),
    ("gas", "The most common gas in Earth's atmosphere is {}.",
     "What is the most common gas in Earth's atmosphere?", "nitrogen"),
    ("gas", "Balloons that float in the air are often filled with {}.",
     "Which gas are floating balloons often filled with?", "helium"),
    ("organ", "The organ that pumps blood around the body is the {}.",
     "Which organ pumps blood around the body?", "heart"),
    ("organ", "The largest organ of the human body is the {}.",
     "What is the largest organ of the human body?", "skin"),
    ("organ", "The organ we think with is the {}.", "Which organ do we think with?", "brain"),
    ("organ", "The organ where swallowed food is first broken down is the {}.",
     "In which organ is swallowed food first broken down?", "stomach"),
    ("author", "{} wrote the play Hamlet.", "Who wrote the play Hamlet?", "William Shakespeare"),
    ("author", "{} wrote the novel Pride and Prejudice.",
     "Who wrote the novel Pride and Prejudice?", "Jane Austen"),
    ("author", "{} wrote the novel War and Peace.", "Who wrote the novel War and Peace?", "Leo Tolstoy"),
    ("author", "{} wrote the novel Oliver Twist.", "Who wrote the novel Oliver Twist?", "Charles Dickens"),
    ("author", "{} wrote the novel Don Quixote.", "Who wrote the novel Don Quixote?", "Miguel de Cervantes"),
    ("author", "{} wrote the novel Les Miserables.", "Who wrote the novel Les Miserables?", "Victor Hugo"),
    ("painter", "{} painted the Mona Lisa.", "Who painted the Mona Lisa?", "Leonardo da Vinci"),
    ("painter", "{} painted The Starry Night.", "Who painted The Starry Night?", "Vincent van Gogh"),
    ("painter", "{} painted Guernica.", "Who painted Guernica?", "Pablo Picasso"),
    ("painter", "{} painted The Night Watch.", "Who painted The Night Watch?", "Rembrandt"),
    ("city", "The Eiffel Tower is in {}.", "In which city is the Eiffel Tower?", "Paris"),
    ("city", "The Colosseum is in {}.", "In which city is the Colosseum?", "Rome"),
    ("city", "The Statue of Liberty is in {}.", "In which city is the Statue of Liberty?", "New York"),
    ("city", "Big Ben is in {}.", "In which city is Big Ben?", "London"),
    ("city", "The Sagrada Familia is in {}.", "In which city is the Sagrada Familia?", "Barcelona"),
    ("country", "The pyramids of Giza are in {}.", "In which country are the pyramids of Giza?", "Egypt"),
    ("country", "The Taj Mahal is in {}.", "In which country is the Taj Mahal?", "India"),
    ("country", "Machu Picchu is in {}.", "In which country is Machu Picchu?", "Peru"),
    ("country", "The city of Kyoto is in {}.", "In which country is the city of Kyoto?", "Japan"),
    ("country", "The Great Wall is in {}.", "In which country is the Great Wall?", "China"),
    ("year", "World War II ended in {}.", "In which year did World War II end?", "1945"),
    ("year", "The first crewed Moon landing took place in {}.",
     "In which year did the first crewed Moon landing take place?", "1969"),
    ("year", "Christopher Columbus first reached the Americas in {}.",
     "In which year did Christopher Columbus first reach the Americas?", "1492"),
    ("year", "The Berlin Wall fell in {}.", "In which year did the Berlin Wall fall?", "1989"),
    ("year", "World War I began in {}.", "In which year did World War I begin?", "1914"),
    ("year", "The Titanic sank in {}.", "In which year did the Titanic sink?", "1912"),
    ("place", "The largest ocean on Earth is the {}.",
     "What is the largest ocean on Earth?", "Pacific Ocean"),
    ("place", "The longest river in Africa is the {}.", "What is the longest river in Africa?", "Nile"),
    ("place", "The largest hot desert on Earth is the {}.",
     "What is the largest hot desert on Earth?", "Sahara"),
    ("place", "The largest rainforest on Earth is the {}.",
     "What is the largest rainforest on Earth?", "Amazon"),
    ("colour", "On a clear day the sky is {}.", "What colour is the sky on a clear day?", "blue"),
    ("colour", "A ripe banana is {}.", "What colour is a ripe banana?", "yellow"),
    ("colour", "Fresh snow is {}.", "What colour is fresh snow?", "white"),
    ("colour", "A ripe tomato is {}.", "What colour is a ripe tomato?", "red"),
    ("colour", "Fresh grass is {}.", "What colour is fresh grass?", "green"),
    ("language", "The main language of Brazil is {}.", "What is the main language of Brazil?", "Portuguese"),
    ("language", "The main language of Mexico is {}.", "What is the main language of Mexico?", "Spanish"),
    ("language", "The main language of Austria is {}.", "What is the main language of Austria?", "German"),
    ("language", "The main language of the Netherlands is {}.",
     "What is the main language of the Netherlands?", "Dutch"),
    ("currency", "The currency of Japan is the {}.", "What is the currency of Japan?", "yen"),
    ("currency", "The currency of India is the {}.", "What is the currency of India?", "rupee"),
    ("currency", "The currency of the United States is the {}.",
     "What is the currency of the United States?", "dollar"),
    ("currency", "The currency of Germany is the {}.", "What is the currency of Germany?", "euro"),
    ("currency", "The currency of the United Kingdom is the {}.",
     "What is the currency of the United Kingdom?", "pound"),
)  # fmt: skip

# Extra short-answer items: (question, answer).
_SHORT_EXTRA: tuple[tuple[str, str], ...] = (
    ("What do bees make?", "honey"), ("What is frozen water called?", "ice"),
    ("Which season comes after winter?", "spring"), ("What is the first month of the year?", "January"),
    ("Which day comes after Monday?", "Tuesday"), ("How many wheels does a bicycle have?", "2"),
    ("What do caterpillars turn into?", "butterflies"), ("What is a young cat called?", "kitten"),
    ("What is a young dog called?", "puppy"), ("What is a young cow called?", "calf"),
    ("What is a young sheep called?", "lamb"), ("What is a young horse called?", "foal"),
    ("What is a young frog called?", "tadpole"), ("What is the plural of mouse?", "mice"),
    ("What is the plural of child?", "children"), ("What is the plural of foot?", "feet"),
    ("What is the plural of tooth?", "teeth"), ("What is the plural of goose?", "geese"),
    ("What colour do you get by mixing blue and yellow?", "green"),
    ("What colour do you get by mixing red and white?", "pink"),
    ("What colour do you get by mixing red and yellow?", "orange"),
    ("What is the largest continent?", "Asia"),
    ("Which ocean lies between Europe and North America?", "Atlantic Ocean"),
    ("Which metal is liquid at room temperature?", "mercury"),
    ("What is the main ingredient of guacamole?", "avocado"),
    ("Who was the first person to walk on the Moon?", "Neil Armstrong"),
    ("Who developed the theory of relativity?", "Albert Einstein"),
    ("Who discovered penicillin?", "Alexander Fleming"),
    ("Who painted the ceiling of the Sistine Chapel?", "Michelangelo"),
    ("Who was the first President of the United States?", "George Washington"),
    ("In which country did the ancient Olympic Games begin?", "Greece"),
    ("What is the hardest natural substance?", "diamond"),
    ("What force pulls objects towards the ground?", "gravity"),
    ("Which bird is a common symbol of peace?", "dove"),
    ("What is the largest bone in the human body?", "femur"),
    ("How many teeth does an adult human usually have?", "32"), ("What is the square root of 81?", "9"),
    ("How many sides does a square have?", "4"), ("What shape has three sides?", "triangle"),
    ("Which gas do humans breathe out?", "carbon dioxide"), ("What is the opposite of hot?", "cold"),
    ("What is the opposite of early?", "late"), ("What is the opposite of heavy?", "light"),
    ("What is the opposite of ancient?", "modern"), ("What is the opposite of empty?", "full"),
    ("What is the opposite of narrow?", "wide"), ("What is the opposite of quiet?", "loud"),
    ("What is the opposite of rough?", "smooth"), ("What is the opposite of shallow?", "deep"),
    ("What is the opposite of victory?", "defeat"),
    ("Which animal is known as the king of the jungle?", "lion"),
    ("How many legs does a cow have?", "4"), ("What do you call a house made of ice blocks?", "igloo"),
    ("Which instrument measures temperature?", "thermometer"),
    ("In which year did the twentieth century begin?", "1901"),
    ("Which is the smallest prime number?", "2"), ("How many centimetres are in a metre?", "100"),
    ("How many grams are in a kilogram?", "1000"),
    ("What is the freezing point of water in degrees Celsius?", "0"),
    ("In which city is the Brandenburg Gate?", "Berlin"), ("What colour are emeralds?", "green"),
    ("How many strings does a violin have?", "4"), ("What is the highest mountain in Africa?", "Kilimanjaro"),
    ("Which animal builds dams across rivers?", "beaver"), ("What do giant pandas mainly eat?", "bamboo"),
    ("What is the main language of Argentina?", "Spanish"), ("Who wrote the Iliad?", "Homer"),
    ("Who composed The Four Seasons?", "Antonio Vivaldi"), ("In which year did World War II begin?", "1939"),
    ("How many players does a basketball team have on the court?", "5"),
    ("What is the currency of Switzerland?", "Swiss franc"),
    ("In which country is the city of Venice?", "Italy"), ("What is the largest country by area?", "Russia"),
    ("What do you call a scientist who studies rocks?", "geologist"),
    ("What do you call a person who bakes bread?", "baker"),
    ("Which month has the fewest days?", "February"), ("How many continents are there?", "7"),
)  # fmt: skip
_ARITHMETIC = (
    (7, 5), (12, 9), (23, 14), (8, 6), (15, 15), (31, 12), (9, 4), (40, 25), (17, 8), (6, 3), (11, 11),
    (50, 30), (4, 7), (13, 6), (26, 19),
)  # fmt: skip


def make_task_sets() -> dict[str, list[TaskExample]]:
    """The task-adapter training sets (fixed; independent of any benchmark seed).

    ``fact_check``: one true and one false claim per common-knowledge fact ("True or false: ...",
    answers "true"/"false"; the false one swaps in the answer of another fact of the same group).
    ``short_answer``: the facts as questions with 1-3 word answers, plus simple arithmetic, word forms and
    general knowledge, to teach a terse answer style.
    ``slot_filling``: ``"<subject> | <relation>"`` -> the object, for common-knowledge triples
    (:data:`.slots.COMMON_SLOTS`).
    """

    rng = random.Random(20250707)
    fact: list[TaskExample] = []
    by_group: dict[str, list[str]] = {}
    for group, _, _, answer in _COMMON_FACTS:
        by_group.setdefault(group, []).append(answer)
    for group, claim, _, answer in _COMMON_FACTS:
        wrong = rng.choice([a for a in by_group[group] if a != answer])
        fact.append(TaskExample(f"True or false: {claim.format(answer)}", "true"))
        fact.append(TaskExample(f"True or false: {claim.format(wrong)}", "false"))
    rng.shuffle(fact)
    short = [TaskExample(q, a) for _, _, q, a in _COMMON_FACTS]
    short += [TaskExample(q, a) for q, a in _SHORT_EXTRA]
    for i, (x, y) in enumerate(_ARITHMETIC):
        if i % 3 == 0:
            short.append(TaskExample(f"What is {x} plus {y}?", str(x + y)))
        elif i % 3 == 1:
            short.append(TaskExample(f"What is {x} minus {y}?", str(x - y)))
        else:
            short.append(TaskExample(f"What is {x} times {y}?", str(x * y)))
    rng.shuffle(short)
    slot = [TaskExample(slot_question(s, r), o) for s, r, o in COMMON_SLOTS]
    random.Random(20261207).shuffle(slot)
    return {"fact_check": fact, "short_answer": short, "slot_filling": slot}
