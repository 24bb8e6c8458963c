"""Generate the small instruction datasets that ship with rlhf-cli.

The files under ``rlhf_cli/assets/`` are committed outputs of this script; they back the
``builtin:*`` data paths used by the default runs and by the tests. Regenerate them with::

    python scripts/make_data.py            # writes rlhf_cli/assets/*.jsonl
    python scripts/make_data.py --out DIR  # writes somewhere else

Generation is deterministic (fixed seeds, standard library only), so the output is
byte-identical on every run. Everything is plain ASCII JSON Lines:

* ``sft.jsonl``        ~400 rows ``{"prompt", "completion"}``: short instructions, good answers.
* ``preference.jsonl`` ~400 rows ``{"prompt", "chosen", "rejected"}``: the chosen answer is
  correct and polite; the rejected one is wrong, rude, off-topic, evasive or unhelpfully terse.
* ``chat.jsonl``       ~100 rows ``{"messages": [...]}``: multi-turn conversations (optional
  system message, 2-3 user turns), always ending with an assistant turn.
* ``prompts.jsonl``    ~200 rows ``{"prompt"}``: held-out prompts (not in sft/preference) for
  online RL and sampling.
* ``hh.jsonl``         ~50 rows ``{"chosen", "rejected"}`` in Anthropic-HH transcript format
  (``"\\n\\nHuman: ...\\n\\nAssistant: ..."``), identical up to the last assistant turn.
* ``arithmetic.jsonl`` 600 rows ``{"prompt", "answer"}``: two-digit +, - and x questions for online
  RL with a calculator environment, scored against the answer column.

Topics are templated but the content is real and correct: arithmetic word problems (answers
computed), capital cities, unit conversions, word definitions, synonyms and antonyms, polite
rewrites, review sentiment, listing examples of a category, and short how-to advice.
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable
from pathlib import Path

SEED = 20240611
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "rlhf_cli" / "assets"

N_SFT = 400
N_PREFERENCE = 400
N_CHAT = 100
N_PROMPTS = 200
N_HH = 50

Item = dict  # see item() for the keys

# --------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------

# (country as used in a sentence, capital, a large non-capital city used as a distractor)
CAPITALS = [
    ("France", "Paris", "Marseille"),
    ("Germany", "Berlin", "Munich"),
    ("Italy", "Rome", "Milan"),
    ("Spain", "Madrid", "Barcelona"),
    ("Portugal", "Lisbon", "Porto"),
    ("Japan", "Tokyo", "Osaka"),
    ("China", "Beijing", "Shanghai"),
    ("India", "New Delhi", "Mumbai"),
    ("Brazil", "Brasilia", "Rio de Janeiro"),
    ("Argentina", "Buenos Aires", "Cordoba"),
    ("Canada", "Ottawa", "Toronto"),
    ("Mexico", "Mexico City", "Guadalajara"),
    ("Australia", "Canberra", "Sydney"),
    ("Egypt", "Cairo", "Alexandria"),
    ("Kenya", "Nairobi", "Mombasa"),
    ("Nigeria", "Abuja", "Lagos"),
    ("South Korea", "Seoul", "Busan"),
    ("Russia", "Moscow", "Saint Petersburg"),
    ("Turkey", "Ankara", "Istanbul"),
    ("Greece", "Athens", "Thessaloniki"),
    ("Sweden", "Stockholm", "Gothenburg"),
    ("Norway", "Oslo", "Bergen"),
    ("Finland", "Helsinki", "Tampere"),
    ("Denmark", "Copenhagen", "Aarhus"),
    ("Poland", "Warsaw", "Krakow"),
    ("Ireland", "Dublin", "Cork"),
    ("the Netherlands", "Amsterdam", "Rotterdam"),
    ("Belgium", "Brussels", "Antwerp"),
    ("Austria", "Vienna", "Salzburg"),
    ("Switzerland", "Bern", "Zurich"),
    ("Peru", "Lima", "Cusco"),
    ("Chile", "Santiago", "Valparaiso"),
    ("Colombia", "Bogota", "Medellin"),
    ("Thailand", "Bangkok", "Chiang Mai"),
    ("Vietnam", "Hanoi", "Ho Chi Minh City"),
    ("Indonesia", "Jakarta", "Surabaya"),
    ("the Philippines", "Manila", "Cebu City"),
    ("Pakistan", "Islamabad", "Karachi"),
    ("Morocco", "Rabat", "Casablanca"),
    ("New Zealand", "Wellington", "Auckland"),
]

# (word, part of speech, definition that reads after "meaning ...")
DEFINITIONS = [
    ("generous", "adjective", "willing to give money, time, or help freely to others"),
    ("curious", "adjective", "eager to learn or know about something"),
    ("ancient", "adjective", "belonging to the very distant past"),
    ("fragile", "adjective", "easily broken or damaged"),
    ("humble", "adjective", "having a modest view of your own importance"),
    ("reluctant", "adjective", "unwilling or hesitant to do something"),
    ("abundant", "adjective", "existing in large amounts; more than enough"),
    ("brave", "adjective", "ready to face danger or pain without showing fear"),
    ("candid", "adjective", "honest and direct, even about uncomfortable things"),
    ("diligent", "adjective", "showing careful and steady effort in your work"),
    ("elated", "adjective", "extremely happy and excited"),
    ("frugal", "adjective", "careful not to waste money or resources"),
    ("gloomy", "adjective", "dark and dull, or feeling sad and without hope"),
    ("hesitate", "verb", "to pause before doing or saying something because you are unsure"),
    ("ignite", "verb", "to catch fire or to set something on fire"),
    ("jovial", "adjective", "cheerful and friendly"),
    ("keen", "adjective", "eager and enthusiastic about something"),
    ("lucid", "adjective", "clear and easy to understand"),
    ("meticulous", "adjective", "paying great attention to detail; very careful and precise"),
    ("novice", "noun", "a person who is new to an activity and has little experience"),
    ("obsolete", "adjective", "no longer produced or used; out of date"),
    ("persevere", "verb", "to keep trying to do something even when it is difficult"),
    ("quaint", "adjective", "attractively unusual or old-fashioned"),
    ("resilient", "adjective", "able to recover quickly from difficulties"),
    ("serene", "adjective", "calm, peaceful, and untroubled"),
    ("tedious", "adjective", "too long, slow, or dull; tiresome"),
    ("vivid", "adjective", "producing strong, clear images in the mind; very bright"),
    ("wary", "adjective", "cautious about possible dangers or problems"),
    ("zealous", "adjective", "full of energy and enthusiasm for a cause or goal"),
    ("ambiguous", "adjective", "open to more than one interpretation; not clear"),
    ("mentor", "noun", "an experienced person who advises and guides someone less experienced"),
    ("procrastinate", "verb", "to delay doing something that you should do"),
]

# (word, synonym, antonym)
WORD_PAIRS = [
    ("happy", "joyful", "sad"),
    ("big", "large", "small"),
    ("fast", "quick", "slow"),
    ("hot", "scorching", "cold"),
    ("begin", "start", "finish"),
    ("brave", "courageous", "cowardly"),
    ("rich", "wealthy", "poor"),
    ("easy", "simple", "difficult"),
    ("quiet", "silent", "loud"),
    ("smart", "intelligent", "foolish"),
    ("angry", "furious", "calm"),
    ("old", "ancient", "new"),
    ("tired", "exhausted", "energetic"),
    ("strong", "powerful", "weak"),
    ("bright", "shiny", "dim"),
    ("generous", "giving", "selfish"),
    ("full", "filled", "empty"),
    ("beautiful", "pretty", "ugly"),
    ("increase", "grow", "decrease"),
    ("accept", "agree", "refuse"),
    ("buy", "purchase", "sell"),
    ("cheap", "inexpensive", "expensive"),
    ("clean", "tidy", "dirty"),
    ("friend", "companion", "enemy"),
    ("love", "adore", "hate"),
    ("wet", "damp", "dry"),
    ("victory", "win", "defeat"),
    ("arrive", "reach", "depart"),
    ("polite", "courteous", "rude"),
    ("huge", "enormous", "tiny"),
]

# (blunt sentence, polite rewrite)
POLITE = [
    ("Give me the report now.", "Could you please send me the report as soon as you can?"),
    ("Move your car.", "Would you mind moving your car, please?"),
    ("Be quiet.", "Could you please keep the noise down a little?"),
    ("Call me back.", "Could you please call me back when you have a moment?"),
    ("Fix this bug today.", "Would it be possible to fix this bug today? Thank you!"),
    ("Send me the file.", "Could you please send me the file when you get a chance?"),
    ("You are late again.", "I noticed you were late again. Is everything okay?"),
    ("Stop interrupting me.", "Would you mind letting me finish my point first, please?"),
    ("Answer my email.", "When you have a moment, could you please reply to my email?"),
    ("Clean up your desk.", "Could you please tidy up your desk when you get a chance?"),
    ("I need my money back by Friday.", "Would it be possible to pay me back by Friday? Thanks!"),
    (
        "This is wrong, redo it.",
        "I think there may be a mistake here. Could you take another look?",
    ),
    ("Tell me your decision.", "Could you please let me know what you decide?"),
    ("Turn the music down.", "Would you mind turning the music down a bit, please?"),
    ("Come to the meeting on time.", "Please try to arrive at the meeting on time. Thank you!"),
    ("Don't touch my stuff.", "Please ask me before using my things. Thanks!"),
]

PRODUCTS = [
    "headphones",
    "blender",
    "backpack",
    "phone case",
    "coffee maker",
    "desk lamp",
    "running shoes",
    "water bottle",
    "keyboard",
    "tent",
    "vacuum cleaner",
    "rain jacket",
]

# (review text with {p} for the product, what the reviewer says)
POSITIVE_REVIEWS = [
    ("The {p} works perfectly and arrived a day early.", "it works perfectly and arrived early"),
    ("I love this {p}. Great quality for the price.", "the quality is great for the price"),
    ("Best {p} I have ever owned, highly recommend!", "it is the best they have owned"),
    (
        "Sturdy, well made, and easy to use. Very happy with this {p}.",
        "it is sturdy, well made, and easy to use",
    ),
    (
        "This {p} exceeded my expectations. Would buy again.",
        "it exceeded their expectations and they would buy it again",
    ),
    ("Excellent {p}, comfortable and reliable every day.", "it is comfortable and reliable"),
    (
        "My whole family enjoys this {p}. Fantastic value.",
        "the whole family enjoys it and it is good value",
    ),
    (
        "Setup took two minutes and the {p} has been flawless since.",
        "setup was quick and it has worked flawlessly",
    ),
]
NEGATIVE_REVIEWS = [
    ("The {p} broke after two days. Very disappointed.", "it broke after only two days"),
    (
        "Cheap materials, and the {p} stopped working within a week.",
        "the materials are cheap and it stopped working within a week",
    ),
    ("Do not buy this {p}. It is a waste of money.", "it is a waste of money"),
    (
        "The {p} arrived damaged and customer service never replied.",
        "it arrived damaged and customer service did not respond",
    ),
    (
        "Terrible quality. The {p} feels flimsy and uncomfortable.",
        "it feels flimsy and uncomfortable",
    ),
    (
        "I returned the {p} because it was too loud and hard to use.",
        "it was loud and hard to use, so they returned it",
    ),
    ("Worst {p} I have bought. It failed on the first use.", "it failed on the first use"),
    (
        "The {p} looks nothing like the photos and smells awful.",
        "it does not match the photos and smells bad",
    ),
]

# (category as plural noun phrase, examples)
CATEGORIES = [
    ("fruits", ["apple", "banana", "orange", "mango", "pear", "grape", "strawberry", "cherry"]),
    (
        "vegetables",
        ["carrot", "broccoli", "spinach", "potato", "onion", "cucumber", "zucchini", "cabbage"],
    ),
    ("colors", ["red", "blue", "green", "yellow", "purple", "pink", "black", "white"]),
    ("animals", ["dog", "cat", "elephant", "giraffe", "lion", "horse", "rabbit", "dolphin"]),
    (
        "planets in our solar system",
        ["Mercury", "Venus", "Earth", "Mars", "Jupiter", "Saturn", "Uranus", "Neptune"],
    ),
    (
        "musical instruments",
        ["piano", "guitar", "violin", "drums", "flute", "trumpet", "cello", "clarinet"],
    ),
    (
        "sports",
        ["soccer", "tennis", "basketball", "swimming", "baseball", "volleyball", "cycling", "golf"],
    ),
    (
        "European countries",
        ["France", "Germany", "Italy", "Spain", "Portugal", "Poland", "Greece", "Sweden"],
    ),
    ("programming languages", ["Python", "Java", "C", "JavaScript", "Rust", "Go", "Ruby"]),
    ("kitchen utensils", ["spoon", "fork", "whisk", "spatula", "ladle", "peeler", "tongs"]),
]
NUMBER_WORDS = {2: "two", 3: "three", 4: "four", 5: "five"}

# (task after "How can I ...", good advice, bad advice)
TIPS = [
    (
        "fall asleep faster",
        "Keep a regular bedtime, avoid screens for an hour before bed, and keep your bedroom cool, "
        "dark, and quiet.",
        "Drink a big cup of coffee right before bed and scroll on your phone until you feel tired.",
    ),
    (
        "save money on groceries",
        "Plan your meals for the week, shop with a list, compare unit prices, and avoid shopping "
        "when you are hungry.",
        "Buy whatever looks good without a list, and always shop when you are hungry.",
    ),
    (
        "stay focused while studying",
        "Put your phone in another room, work in 25-minute blocks with short breaks, and tackle one "
        "task at a time.",
        "Keep your phone next to you with notifications on and switch subjects every few minutes.",
    ),
    (
        "remember new vocabulary words",
        "Review them with flashcards using spaced repetition, use each new word in a sentence, and "
        "say it out loud.",
        "Read the list once and trust that you will remember it.",
    ),
    (
        "keep my houseplants alive",
        "Check the soil before watering, give each plant the light it needs, and use pots with "
        "drainage holes.",
        "Water them every single day no matter what, and keep them in a dark closet.",
    ),
    (
        "make a good impression at a job interview",
        "Research the company, arrive a few minutes early, make eye contact, and prepare short "
        "examples of your past work.",
        "Show up a little late so you seem busy, and do not bother learning about the company.",
    ),
    (
        "reduce stress after work",
        "Take a short walk, set a clear end to your workday, and spend a few minutes on something "
        "you enjoy, like music or reading.",
        "Keep checking your work email all evening so nothing surprises you.",
    ),
    (
        "start running as a beginner",
        "Begin with short run-walk intervals three times a week, wear comfortable shoes, and "
        "increase your distance slowly.",
        "Run as far as you can on the first day, even if it hurts.",
    ),
    (
        "write a clear email",
        "Use a specific subject line, state your main point in the first sentence, keep paragraphs "
        "short, and end with a clear request.",
        "Write one long paragraph with no subject line and put your request at the very end.",
    ),
    (
        "cook rice that is not sticky",
        "Rinse the rice until the water runs clear, use the right amount of water, and let it rest "
        "covered for five minutes after cooking.",
        "Stir it constantly while it cooks and add lots of extra water to be safe.",
    ),
    (
        "drink more water during the day",
        "Carry a reusable bottle, drink a glass with every meal, and set a few reminders on your "
        "phone.",
        "Wait until you feel very thirsty, then drink as much as you can at once.",
    ),
    (
        "keep my computer secure",
        "Install updates promptly, use a password manager with unique passwords, and turn on "
        "two-factor authentication.",
        "Use the same simple password everywhere and turn off updates because they are annoying.",
    ),
    (
        "learn to play the guitar",
        "Practice for 15 minutes every day, learn a few basic chords first, and play along with "
        "simple songs you like.",
        "Practice once a month for several hours and skip the basic chords.",
    ),
    (
        "organize a messy closet",
        "Take everything out, donate what you have not worn in a year, and group the rest by type "
        "before putting it back.",
        "Buy more storage boxes and push everything in without sorting it.",
    ),
    (
        "get better at public speaking",
        "Practice out loud several times, know your opening lines well, slow down, and pause "
        "instead of using filler words.",
        "Memorize nothing, speak as fast as you can, and avoid looking at the audience.",
    ),
    (
        "make my phone battery last longer",
        "Lower the screen brightness, close apps you are not using, and turn off location access "
        "for apps that do not need it.",
        "Keep the brightness at maximum and leave all your apps running in the background.",
    ),
    (
        "prepare for a long flight",
        "Drink plenty of water, wear comfortable layers, bring a neck pillow, and get up to stretch "
        "every couple of hours.",
        "Skip drinking water and stay in your seat for the whole flight.",
    ),
    (
        "be more productive in the morning",
        "Prepare the night before, wake up at a consistent time, and do your most important task "
        "before checking email.",
        "Check email and social media first thing and decide what to do later.",
    ),
    (
        "remove a coffee stain from a shirt",
        "Blot the stain with cold water right away, rub in a little liquid detergent, let it sit, "
        "and then wash as usual.",
        "Rub it hard with hot water and let it dry before washing.",
    ),
    (
        "make friends after moving to a new city",
        "Join a club or class built around a hobby, say yes to invitations, and follow up with "
        "people you enjoyed meeting.",
        "Stay home and wait for people to invite you somewhere.",
    ),
]

NAMES = [
    "Sam",
    "Maria",
    "Leo",
    "Aisha",
    "Tom",
    "Priya",
    "Ben",
    "Chen",
    "Nora",
    "Omar",
    "Lucy",
    "Diego",
]
THINGS = ["apples", "pencils", "marbles", "stickers", "cookies", "books", "stamps", "cards"]
PRICED = [
    ("notebook", "notebooks"),
    ("sandwich", "sandwiches"),
    ("ticket", "tickets"),
    ("plant", "plants"),
    ("mug", "mugs"),
    ("scarf", "scarves"),
]

SYSTEM_PROMPTS = [
    "You are a helpful assistant.",
    "You are a friendly assistant that gives short, accurate answers.",
    "You are a concise tutor. Answer clearly and correctly.",
    "You are a polite and helpful assistant. Keep your answers brief.",
]

FRIENDLY_OPENERS = ["Sure! ", "Of course. ", "Good question! ", "Happy to help. ", "Certainly. "]

RUDE_OPENERS = [
    "Ugh, seriously?",
    "Wow, what a dumb question.",
    "Whatever.",
    "Can't you figure this out yourself?",
    "Not this again.",
    "Fine, I guess.",
    "Honestly, this is so basic.",
    "Why are you even asking me?",
]
RUDE_TAILS = [
    "",
    "",
    " Happy now?",
    " Obviously.",
    " Next time look it up.",
    " Don't bother me again.",
]
DISMISSALS = [
    "Look it up yourself.",
    "Just Google it.",
    "Figure it out on your own.",
    "I'm not your personal assistant.",
    "Stop wasting my time.",
    "Ask someone else.",
]
TERSE = [
    "I don't know.",
    "No idea.",
    "Not sure.",
    "Can't help with that.",
    "Dunno.",
    "Who knows?",
    "Pass.",
    "Maybe.",
]
RAMBLES = [
    "That's a really interesting question, and there are many ways to think about it. It "
    "depends on a lot of factors, so it is hard to say anything definite. You might want to "
    "research it further.",
    "Well, people have different opinions about this, and I wouldn't want to choose one. "
    "Everyone has to decide for themselves in the end.",
    "Hmm, let me think. There are a lot of things to consider here, and I'm not really sure "
    "where to begin, so I'll leave it to you.",
    "Great question! Questions like this come up all the time, and they are worth thinking "
    "about carefully. I hope that helps.",
]
OFF_TOPIC = [
    "Did you know that octopuses have three hearts? Anyway, I really love the ocean.",
    "My favorite color is blue, and I think Tuesdays are the best day of the week.",
    "Let's talk about something else. Have you seen any good movies lately?",
    "The weather has been lovely recently, perfect for a picnic in the park.",
]
THANKS = [
    ("Thanks, that helps!", "You're welcome! Let me know if you have any other questions."),
    ("Great, thank you.", "Glad I could help. Feel free to ask anything else."),
    ("Perfect, thanks a lot!", "You're very welcome! Have a great day."),
]


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------


def cap1(text: str) -> str:
    return text[:1].upper() + text[1:]


def join_items(items: list[str]) -> str:
    if len(items) == 2:
        return f"{items[0]} and {items[1]}"
    return ", ".join(items[:-1]) + f", and {items[-1]}"


def fmt_num(x: float) -> str:
    """One decimal place, dropping a trailing .0 (6.2, 212, -3.9)."""
    text = f"{x:.1f}"
    if text == "-0.0":
        text = "0.0"
    return text[:-2] if text.endswith(".0") else text


def item(
    topic: str,
    prompt: str,
    answer: str,
    wrong: str | None,
    rude_core: str | None,
    kind: str | None = None,
    subject: str | None = None,
) -> Item:
    """``subject`` names what is asked about (a country, a word), so follow-ups can avoid it."""
    return {
        "topic": topic,
        "kind": kind,
        "subject": subject,
        "prompt": prompt,
        "answer": answer,
        "wrong": wrong,
        "rude_core": rude_core,
    }


# --------------------------------------------------------------------------------------
# Topic generators: each returns an Item; ``short`` gives a follow-up phrasing for chats
# and ``kind`` pins the sub-kind so a follow-up stays on the same kind of question.
# --------------------------------------------------------------------------------------


def _wrong_delta(rng: random.Random, value: int) -> int:
    delta = rng.choice([-10, -2, -1, 1, 2, 10])
    if value + delta <= 0:
        delta = abs(delta)
    return value + delta


def gen_arithmetic(rng: random.Random, short: bool = False, kind: str | None = None) -> Item:
    kind = kind or rng.choice(["add", "sub", "mul", "div", "price", "speed"])
    name = rng.choice(NAMES)
    thing = rng.choice(THINGS)
    if kind == "add":
        a, b = rng.randint(3, 60), rng.randint(2, 40)
        r = a + b
        prompt = rng.choice(
            [
                f"{name} has {a} {thing} and buys {b} more. How many {thing} does {name} have now?",
                f"If {name} starts with {a} {thing} and gets {b} more, how many {thing} are there "
                "in total?",
                f"Solve this: {name} collected {a} {thing} on Monday and {b} on Tuesday. How many "
                "is that altogether?",
            ]
        )
        tmpl = "{a} + {b} = {r}, so {name} has {r} {thing}."
    elif kind == "sub":
        a = rng.randint(12, 90)
        b = rng.randint(2, a - 2)
        r = a - b
        prompt = rng.choice(
            [
                f"{name} had {a} {thing} and gave {b} to a friend. How many {thing} are left?",
                f"There are {a} {thing} in a jar. {name} takes out {b}. How many remain in the jar?",
                f"{name} owns {a} {thing} but loses {b} of them. How many {thing} does {name} "
                "have left?",
            ]
        )
        tmpl = "{a} - {b} = {r}, so {r} {thing} are left."
    elif kind == "mul":
        a, b = rng.randint(3, 12), rng.randint(2, 12)
        r = a * b
        prompt = rng.choice(
            [
                f"A box holds {a} {thing}. How many {thing} are in {b} boxes?",
                f"{name} has {b} bags with {a} {thing} in each bag. How many {thing} is that "
                "in total?",
                f"If each of {b} students brings {a} {thing}, how many {thing} do they bring "
                "altogether?",
            ]
        )
        tmpl = "{b} x {a} = {r}, so there are {r} {thing} in total."
    elif kind == "div":
        b = rng.randint(2, 9)
        r = rng.randint(2, 12)
        a = b * r
        prompt = rng.choice(
            [
                f"{name} shares {a} {thing} equally among {b} friends. How many does each friend "
                "get?",
                f"{a} {thing} are split evenly into {b} groups. How many {thing} are in each group?",
            ]
        )
        tmpl = "{a} / {b} = {r}, so each gets {r} {thing}."
    elif kind == "price":
        one, many = rng.choice(PRICED)
        price, n = rng.randint(2, 25), rng.randint(2, 9)
        r = price * n
        prompt = rng.choice(
            [
                f"A {one} costs ${price}. How much do {n} {many} cost?",
                f"{name} buys {n} {many} at ${price} each. How much does {name} spend in total?",
            ]
        )
        answer = f"{n} x ${price} = ${r}, so the total is ${r}."
        wrong_r = _wrong_delta(rng, r)
        wrong = f"{n} x ${price} = ${wrong_r}, so the total is ${wrong_r}."
        if short:
            prompt = f"And how much would {n} {many} at ${price} each cost?"
        return item("arithmetic", prompt, answer, wrong, f"${r}.", kind)
    else:  # speed
        speed, hours = rng.choice([40, 50, 60, 70, 80, 90, 100, 120]), rng.randint(2, 6)
        r = speed * hours
        prompt = rng.choice(
            [
                f"A train travels at {speed} km per hour for {hours} hours. How far does it go?",
                f"{name} drives for {hours} hours at a steady {speed} km/h. How many kilometers "
                f"does {name} cover?",
            ]
        )
        answer = f"Distance is speed times time: {speed} x {hours} = {r} kilometers."
        wrong_r = _wrong_delta(rng, r)
        wrong = f"Distance is speed times time: {speed} x {hours} = {wrong_r} kilometers."
        if short:
            prompt = f"What if it went {speed} km per hour for {hours} hours instead?"
        return item("arithmetic", prompt, answer, wrong, f"{r} km.", kind)
    answer = tmpl.format(a=a, b=b, r=r, name=name, thing=thing)
    wrong_r = _wrong_delta(rng, r)
    wrong = tmpl.format(a=a, b=b, r=wrong_r, name=name, thing=thing)
    if short:
        prompt = {
            "add": f"And what if {name} had {a} {thing} and got {b} more?",
            "sub": f"And if {name} had {a} {thing} and gave away {b}?",
            "mul": f"What about {b} boxes with {a} {thing} each?",
            "div": f"And {a} {thing} shared among {b} friends?",
        }[kind]
    return item("arithmetic", prompt, answer, wrong, f"{r} {thing}.", kind)


def gen_capital(rng: random.Random, short: bool = False, kind: str | None = None) -> Item:
    country, capital, distractor = rng.choice(CAPITALS)
    if short:
        prompt = rng.choice(
            [
                f"And what about {country}?",
                f"What is the capital of {country}?",
                f"How about {country}?",
            ]
        )
    else:
        prompt = rng.choice(
            [
                f"What is the capital of {country}?",
                f"Which city is the capital of {country}?",
                f"Can you tell me the capital city of {country}?",
                f"What city serves as the capital of {country}?",
                f"I always forget: what is the capital of {country}?",
            ]
        )
    tmpl = rng.choice(
        [
            "The capital of {c} is {x}.",
            "{x} is the capital of {c}.",
            "The capital city of {c} is {x}.",
        ]
    )
    answer = cap1(tmpl.format(c=country, x=capital))
    if rng.random() < 0.7:
        wrong_city = distractor
    else:
        wrong_city = rng.choice([c[1] for c in CAPITALS if c[1] != capital])
    wrong = cap1(tmpl.format(c=country, x=wrong_city))
    return item("capital", prompt, answer, wrong, f"It's {capital}.", subject=country)


CONVERSIONS = {
    # kind: (from unit, to unit, conversion, a plausible mistake: the inverse factor)
    "km_mi": ("kilometers", "miles", lambda v: v * 0.621371, lambda v: v * 1.609344),
    "mi_km": ("miles", "kilometers", lambda v: v * 1.609344, lambda v: v * 0.621371),
    "c_f": (
        "degrees Celsius",
        "degrees Fahrenheit",
        lambda v: v * 9 / 5 + 32,
        lambda v: v * 5 / 9 + 32,
    ),
    "f_c": (
        "degrees Fahrenheit",
        "degrees Celsius",
        lambda v: (v - 32) * 5 / 9,
        lambda v: (v - 32) * 9 / 5,
    ),
    "kg_lb": ("kilograms", "pounds", lambda v: v * 2.20462, lambda v: v * 0.453592),
    "lb_kg": ("pounds", "kilograms", lambda v: v * 0.453592, lambda v: v * 2.20462),
}
CONVERSION_NOTES = {
    "km_mi": "One kilometer is about 0.62 miles.",
    "mi_km": "One mile is about 1.61 kilometers.",
    "c_f": "Multiply by 9/5 and add 32.",
    "f_c": "Subtract 32 and multiply by 5/9.",
    "kg_lb": "One kilogram is about 2.2 pounds.",
    "lb_kg": "One pound is about 0.45 kilograms.",
}
CONVERSION_VALUES = {  # never 1, so unit names can stay plural
    "km_mi": [2, 3, 5, 8, 10, 12, 15, 20, 21, 25, 42, 50, 100],
    "mi_km": [2, 3, 4, 5, 6, 10, 13, 20, 26, 50, 100],
    "c_f": [-10, 0, 5, 10, 15, 20, 22, 25, 30, 37, 40, 100],
    "f_c": [0, 32, 40, 50, 60, 68, 75, 80, 90, 98, 100, 212],
    "kg_lb": [2, 3, 5, 10, 15, 20, 25, 50, 60, 75, 100],
    "lb_kg": [2, 5, 10, 20, 50, 100, 150, 180, 200, 250],
}


def gen_conversion(rng: random.Random, short: bool = False, kind: str | None = None) -> Item:
    kind = kind or rng.choice(sorted(CONVERSIONS))
    src, dst, fn, wrong_fn = CONVERSIONS[kind]
    v = rng.choice(CONVERSION_VALUES[kind])
    result, bad = fmt_num(fn(v)), fmt_num(wrong_fn(v))
    if bad == result:  # 0 C / 32 F: the inverse factor happens to give the right answer
        bad = fmt_num(fn(v) + 10)
    if short:
        prompt = rng.choice([f"And {v} {src}?", f"What about {v} {src}?"])
    else:
        prompt = rng.choice(
            [
                f"Convert {v} {src} to {dst}.",
                f"How many {dst} is {v} {src}?",
                f"What is {v} {src} in {dst}?",
                f"Please convert {v} {src} into {dst}.",
            ]
        )
    exact = abs(fn(v) - round(fn(v), 1)) < 1e-9
    verb = "is" if exact else "is about"
    note = CONVERSION_NOTES[kind]
    if rng.random() < 0.5:
        answer = f"{v} {src} {verb} {result} {dst}. {note}"
        wrong = f"{v} {src} {verb} {bad} {dst}. {note}"
    else:
        answer = f"{v} {src} {verb} {result} {dst}."
        wrong = f"{v} {src} {verb} {bad} {dst}."
    return item("conversion", prompt, answer, wrong, f"{result} {dst}.", kind, str(v))


def gen_definition(rng: random.Random, short: bool = False, kind: str | None = None) -> Item:
    word, pos, meaning = rng.choice(DEFINITIONS)
    if short:
        prompt = rng.choice([f"And what does '{word}' mean?", f"How about the word '{word}'?"])
    else:
        prompt = rng.choice(
            [
                f"What does the word '{word}' mean?",
                f"Define the word '{word}' in simple terms.",
                f"Can you explain what '{word}' means?",
                f"Give me a short definition of '{word}'.",
            ]
        )
    article = "an" if pos[0] in "aeiou" else "a"
    other = rng.choice([d for d in DEFINITIONS if d[0] != word])
    tmpl = rng.choice(
        [
            "'{W}' is {art} {pos} meaning {m}.",
            "{W} ({pos}): {m}.",
            "The word '{w}' means {m}.",
        ]
    )
    answer = tmpl.format(W=cap1(word), w=word, art=article, pos=pos, m=meaning)
    wrong = tmpl.format(W=cap1(word), w=word, art=article, pos=pos, m=other[2])
    return item("definition", prompt, answer, wrong, cap1(meaning) + ".", subject=word)


def gen_wordpair(rng: random.Random, short: bool = False, kind: str | None = None) -> Item:
    kind = kind or rng.choice(["synonym", "antonym"])
    word, syn, ant = rng.choice(WORD_PAIRS)
    if kind == "antonym":
        target, other = ant, syn
        if short:
            prompt = f"And the opposite of '{word}'?"
        else:
            prompt = rng.choice(
                [
                    f"What is the opposite of '{word}'?",
                    f"Give me an antonym for the word '{word}'.",
                    f"What word means the opposite of '{word}'?",
                ]
            )
        tmpl = rng.choice(["The opposite of '{w}' is '{t}'.", "An antonym for '{w}' is '{t}'."])
    else:
        target, other = syn, ant
        if short:
            prompt = f"And a synonym for '{word}'?"
        else:
            prompt = rng.choice(
                [
                    f"What is a synonym for '{word}'?",
                    f"Give me another word that means '{word}'.",
                    f"Suggest a word with the same meaning as '{word}'.",
                ]
            )
        tmpl = rng.choice(["A synonym for '{w}' is '{t}'.", "'{T}' means the same as '{w}'."])
    answer = tmpl.format(w=word, t=target, T=cap1(target))
    wrong = tmpl.format(w=word, t=other, T=cap1(other))
    return item("wordpair", prompt, answer, wrong, f"'{cap1(target)}'.", kind, word)


def gen_polite(rng: random.Random, short: bool = False, kind: str | None = None) -> Item:
    blunt, polite = rng.choice(POLITE)
    if short:
        prompt = f'Now do the same for: "{blunt}"'
    else:
        prompt = rng.choice(
            [
                f'Rewrite this sentence so it sounds more polite: "{blunt}"',
                f'Make this more polite: "{blunt}"',
                f'How could I say "{blunt}" in a more polite way?',
                f'Please rephrase politely: "{blunt}"',
            ]
        )
    answer = rng.choice(
        [polite, f'A more polite version: "{polite}"', f'You could say: "{polite}"']
    )
    wrong = rng.choice(
        [
            f'You could say: "{blunt[:-1].upper()}. NOW."',
            f'You could say: "{blunt} And don\'t make me ask twice."',
            f'A more polite version: "{blunt}"',
        ]
    )
    return item("polite", prompt, answer, wrong, None, subject=blunt)


def gen_sentiment(rng: random.Random, short: bool = False, kind: str | None = None) -> Item:
    kind = kind or rng.choice(["positive", "negative"])
    product = rng.choice(PRODUCTS)
    table = POSITIVE_REVIEWS if kind == "positive" else NEGATIVE_REVIEWS
    review, reason = rng.choice(table)
    review = cap1(review.format(p=product))
    if short:
        prompt = f'And this one? "{review}"'
    else:
        prompt = rng.choice(
            [
                f'Classify the sentiment of this review as positive or negative: "{review}"',
                f'Is this product review positive or negative? "{review}"',
                f'What is the sentiment of the following review? "{review}"',
            ]
        )
    flip = "negative" if kind == "positive" else "positive"
    tmpl = rng.choice(
        ["{L}. The reviewer says {r}.", "The sentiment is {l}: the reviewer says {r}."]
    )
    answer = tmpl.format(L=cap1(kind), l=kind, r=reason)
    wrong = tmpl.format(L=cap1(flip), l=flip, r=reason)
    return item("sentiment", prompt, answer, wrong, f"{cap1(kind)}.", subject=review)


def gen_listing(rng: random.Random, short: bool = False, kind: str | None = None) -> Item:
    ci = rng.randrange(len(CATEGORIES))
    cat, examples = CATEGORIES[ci]
    n = rng.choice([2, 3, 3, 3, 4, 5])
    word = NUMBER_WORDS[n]
    picks = rng.sample(examples, n)
    if short:
        prompt = f"Now name {word} {cat}."
    else:
        prompt = rng.choice(
            [
                f"Can you name {word} {cat}?",
                f"Please list {word} different {cat}.",
                f"Give me {word} examples of {cat}.",
                f"Could you name {word} {cat}, please?",
                f"I need {word} {cat} for a quiz. Any ideas?",
            ]
        )
    listed = join_items(picks)
    every = "both" if n == 2 else "all"
    answer = rng.choice(
        [
            f"Here are {word} {cat}: {listed}.",
            f"Sure! {cap1(listed)} are {word} {cat}.",
            f"{cap1(listed)} are {every} {cat}.",
        ]
    )
    other = CATEGORIES[(ci + rng.randint(1, len(CATEGORIES) - 1)) % len(CATEGORIES)][1]
    bad = picks[:1] + rng.sample(other, n - 1)
    wrong = f"Here are {word} {cat}: {join_items(bad)}."
    return item("listing", prompt, answer, wrong, f"{cap1(listed)}.", subject=cat)


def gen_tip(rng: random.Random, short: bool = False, kind: str | None = None) -> Item:
    task, good, bad = rng.choice(TIPS)
    prompt = rng.choice(
        [
            f"How can I {task}?",
            f"Do you have any tips to {task}?",
            f"What is a good way to {task}?",
            f"Any advice on how to {task}?",
        ]
    )
    if short:
        prompt = f"One more: how can I {task}?"
    answer = rng.choice([good, f"Here are a few tips: {good[0].lower()}{good[1:]}", good])
    return item("tip", prompt, answer, bad, None, subject=task)


GENERATORS: list[tuple[str, Callable[..., Item], int]] = [
    ("arithmetic", gen_arithmetic, 16),
    ("capital", gen_capital, 12),
    ("conversion", gen_conversion, 12),
    ("definition", gen_definition, 11),
    ("wordpair", gen_wordpair, 10),
    ("polite", gen_polite, 8),
    ("sentiment", gen_sentiment, 11),
    ("listing", gen_listing, 10),
    ("tip", gen_tip, 10),
]
GEN_BY_TOPIC = {name: fn for name, fn, _ in GENERATORS}


def random_item(rng: random.Random) -> Item:
    names = [g[0] for g in GENERATORS]
    weights = [g[2] for g in GENERATORS]
    topic = rng.choices(names, weights=weights)[0]
    return GEN_BY_TOPIC[topic](rng)


def unique_items(rng: random.Random, n: int, seen: set[str]) -> list[Item]:
    """Draw ``n`` items whose prompts are not in ``seen`` (which is updated)."""
    out: list[Item] = []
    while len(out) < n:
        it = random_item(rng)
        if it["prompt"] in seen:
            continue
        seen.add(it["prompt"])
        out.append(it)
    return out


def chosen_text(rng: random.Random, it: Item) -> str:
    if rng.random() < 0.25:
        return rng.choice(FRIENDLY_OPENERS) + it["answer"]
    return it["answer"]


def rejected_text(rng: random.Random, it: Item) -> str:
    kind = rng.choices(
        ["wrong", "rude", "offtopic", "terse", "ramble"], weights=[36, 26, 13, 12, 13]
    )[0]
    if kind == "wrong" and it["wrong"] is not None:
        if rng.random() < 0.2:
            return rng.choice(FRIENDLY_OPENERS) + it["wrong"]
        return it["wrong"]
    if kind in ("wrong", "rude"):
        opener = rng.choice(RUDE_OPENERS)
        if it["rude_core"] is not None and rng.random() < 0.6:
            return f"{opener} {it['rude_core']}{rng.choice(RUDE_TAILS)}"
        return f"{opener} {rng.choice(DISMISSALS)}"
    if kind == "offtopic":
        if rng.random() < 0.5:
            return rng.choice(OFF_TOPIC)
        while True:
            other = random_item(rng)
            if other["topic"] != it["topic"]:
                return other["answer"]
    if kind == "terse":
        return rng.choice(TERSE)
    return rng.choice(RAMBLES)


# --------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------


def build_sft(rng: random.Random, seen: set[str]) -> list[dict]:
    rows = []
    for it in unique_items(rng, N_SFT, seen):
        answer = it["answer"]
        if rng.random() < 0.1:
            answer = rng.choice(FRIENDLY_OPENERS) + answer
        rows.append({"prompt": it["prompt"], "completion": answer})
    return rows


def build_preference(rng: random.Random, seen: set[str]) -> list[dict]:
    rows = []
    for it in unique_items(rng, N_PREFERENCE, seen):
        rows.append(
            {
                "prompt": it["prompt"],
                "chosen": chosen_text(rng, it),
                "rejected": rejected_text(rng, it),
            }
        )
    return rows


def follow_up(rng: random.Random, prev: Item) -> Item:
    """A next user turn: a short same-topic follow-up or a fresh question."""
    same_topic = rng.random() < 0.55
    while True:
        if same_topic:
            # Same topic and sub-kind (e.g. km -> miles again), phrased as a short follow-up.
            nxt = GEN_BY_TOPIC[prev["topic"]](rng, short=True, kind=prev["kind"])
        else:
            nxt = random_item(rng)
        repeated = nxt["subject"] is not None and nxt["subject"] == prev["subject"]
        if not repeated and nxt["answer"] != prev["answer"] and nxt["prompt"] != prev["prompt"]:
            return nxt


def build_chat(rng: random.Random) -> list[dict]:
    rows = []
    for _ in range(N_CHAT):
        messages = []
        if rng.random() < 0.6:
            messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
        n_turns = rng.choice([2, 2, 3])
        it = random_item(rng)
        for turn in range(n_turns):
            if turn == n_turns - 1 and turn > 0 and rng.random() < 0.15:
                user, reply = rng.choice(THANKS)
                messages.append({"role": "user", "content": user})
                messages.append({"role": "assistant", "content": reply})
                break
            if turn > 0:
                it = follow_up(rng, it)
            messages.append({"role": "user", "content": it["prompt"]})
            messages.append({"role": "assistant", "content": it["answer"]})
        rows.append({"messages": messages})
    return rows


def build_prompts(rng: random.Random, seen: set[str]) -> list[dict]:
    return [{"prompt": it["prompt"]} for it in unique_items(rng, N_PROMPTS, seen)]


def build_hh(rng: random.Random) -> list[dict]:
    rows = []
    for _ in range(N_HH):
        prefix = ""
        it = random_item(rng)
        if rng.random() < 0.4:
            prefix = f"\n\nHuman: {it['prompt']}\n\nAssistant: {it['answer']}"
            it = follow_up(rng, it)
        prefix += f"\n\nHuman: {it['prompt']}\n\nAssistant:"
        chosen = chosen_text(rng, it)
        rejected = rejected_text(rng, it)
        rows.append({"chosen": f"{prefix} {chosen}", "rejected": f"{prefix} {rejected}"})
    return rows


N_ARITHMETIC = 600


def build_arithmetic(rng: random.Random) -> list[dict]:
    """A verifiable task for online RL with a calculator (rlhf_cli.multiturn.CalculatorEnv):
    two-digit +, - or x questions, the value in an `answer` column the prompt does not give."""
    rows = []
    for _ in range(N_ARITHMETIC):
        a, b, op = rng.randint(10, 99), rng.randint(10, 99), rng.choice("+-*")
        value = {"+": a + b, "-": a - b, "*": a * b}[op]
        prompt = f"What is {a} {op} {b}? Write the calculation, a calculator will check it."
        rows.append({"prompt": prompt, "answer": value})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    text = "".join(json.dumps(row, ensure_ascii=True) + "\n" for row in rows)
    path.write_bytes(text.encode("ascii"))


def build_all() -> dict[str, list[dict]]:
    seen: set[str] = set()  # prompts used by sft/preference, kept out of prompts.jsonl
    return {
        "sft.jsonl": build_sft(random.Random(SEED), seen),
        "preference.jsonl": build_preference(random.Random(SEED + 1), seen),
        "chat.jsonl": build_chat(random.Random(SEED + 2)),
        "prompts.jsonl": build_prompts(random.Random(SEED + 3), seen),
        "hh.jsonl": build_hh(random.Random(SEED + 4)),
        "arithmetic.jsonl": build_arithmetic(random.Random(SEED + 5)),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help="output directory (default: rlhf_cli/assets)"
    )
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, rows in build_all().items():
        path = args.out / name
        write_jsonl(path, rows)
        print(f"wrote {path} ({len(rows)} rows, {path.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
