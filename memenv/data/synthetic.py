"""Deterministic synthetic multi-session conversations with a gold memory-operation log.

The generator first simulates a small world, then writes the dialogue about it:

1. **World.** Two speakers and a few third parties (relatives, friends) that the speakers talk
   about. Entities have single-valued attributes (city, job, partner, car, field of study; third
   parties share city and job with the speakers) and set-valued ones (pets, hobbies, allergies).
2. **Events.** Every fact-carrying turn applies one event to the speaker's own facts or to one
   of the speaker's third parties: introduce a value (ADD), replace it (UPDATE), add a member to a
   set (ADD, also "a second dog": complementary, not a replacement), remove a member or retract a
   value ("I sold my car": DELETE), or restate a known value (NOOP). Other turns are chit-chat
   distractors and acknowledgements. Each slot changes at most once per session.
3. **Gold log.** Each fact turn has one :class:`~memenv.types.GoldOp`: the atomic fact as an
   extractor should write it (third person, starting with the subject's name), the operation a
   perfect manager applies, the slot ``key`` and the memory ``text`` after the operation. The
   text always equals the fact, so a small model can learn it by copying. An update fact keeps
   the replaced value as a second sentence ("Alice now lives in Lyon. Alice previously lived in
   Paris."), so one memory per slot answers both the current and the previous value.
4. **Questions.** After each session the generator reads the world state and derives the
   questions it supports (current value, previous value, set members, set size, "none" for a
   retracted fact, the date of a change). A question stays open while its answer holds; when
   the answer changes, the question is closed (``valid_until``) and a new one opens.

Everything is drawn from one ``np.random.default_rng(seed)``, so the same seed and config give
an identical :class:`~memenv.types.Conversation`.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass, field

import numpy as np

from memenv.types import OP_ADD, OP_DELETE, OP_NOOP, OP_UPDATE, Conversation, GoldOp, QAItem, Session, Turn, parse_dia_id

__all__ = ["SyntheticConfig", "generate_conversation", "generate_conversations"]

# Question categories (QAItem.category).
CURRENT, PREVIOUS, SET, COUNT, ABSTENTION, WHEN = (
    "current_value",
    "previous_value",
    "set",
    "count",
    "abstention",
    "when",
)
#: The gold answer of an abstention question.
NONE_ANSWER = "none"

_MONTHS = (
    "January", "February", "March", "April", "May", "June",
    "July", "August", "September", "October", "November", "December",
)

# ---------------------------------------------------------------------------------------------
# Value pools. They are disjoint word for word, hold no stop word and no word of the question
# templates, so that a question about one slot never matches the memory of another by accident
# (tests/test_synthetic.py checks this).
# ---------------------------------------------------------------------------------------------

PERSON_NAMES = (
    "Alice", "Bruno", "Carmen", "Dmitri", "Elena", "Farid", "Greta", "Hiro", "Ingrid", "Jonas",
    "Keiko", "Liam", "Marta", "Nadia", "Oscar", "Priya", "Quentin", "Rosa", "Stefan", "Tamsin",
    "Umar", "Vera", "Wesley", "Ximena", "Yusuf", "Zara", "Amara", "Bianca", "Caleb", "Delia",
    "Emil", "Fiona", "Gideon", "Hana", "Idris", "Joelle", "Kofi", "Lena", "Mateo", "Noor",
)
PARTNER_NAMES = (
    "Sam", "Chris", "Jordan", "Taylor", "Alex", "Robin", "Casey", "Morgan", "Jamie", "Riley",
    "Avery", "Quinn", "Dana", "Jesse", "Kai", "Sasha", "Rowan", "Blake", "Reese", "Skyler",
    "Emerson", "Hayden", "Logan", "Parker",
)
PET_NAMES = (
    "Rex", "Luna", "Milo", "Bella", "Coco", "Oreo", "Biscuit", "Pepper", "Ziggy", "Nala",
    "Simba", "Waffles", "Mochi", "Pickles", "Olive", "Noodle", "Juniper", "Marble", "Clover",
    "Sprout", "Pumpkin", "Shadow", "Pixel", "Nugget", "Gizmo",
)
SPECIES = ("dog", "cat", "rabbit", "parrot", "hamster", "turtle", "ferret", "gecko")
CITIES = (
    "Paris", "Lyon", "Berlin", "Madrid", "Lisbon", "Vienna", "Prague", "Oslo", "Dublin", "Boston",
    "Denver", "Seattle", "Toronto", "Montreal", "Chicago", "Austin", "Portland", "Melbourne",
    "Auckland", "Osaka", "Kyoto", "Seoul", "Singapore", "Nairobi", "Marrakesh", "Barcelona",
    "Edinburgh", "Copenhagen", "Helsinki", "Krakow", "Budapest", "Athens", "Istanbul",
    "Vancouver", "Atlanta", "Miami", "Zurich", "Hamburg", "Munich", "Milan", "Seville", "Porto",
)
JOBS = (
    "nurse", "teacher", "architect", "accountant", "software engineer", "chef",
    "graphic designer", "pharmacist", "electrician", "journalist", "librarian", "paramedic",
    "veterinarian", "lawyer", "carpenter", "translator", "dentist", "physiotherapist",
    "firefighter", "pilot", "barista", "project manager", "mechanic", "social worker",
    "florist", "tour guide", "personal trainer", "museum curator", "urban planner",
)
CARS = (
    "Honda Civic", "Toyota Corolla", "Ford Focus", "Subaru Outback", "Tesla Model 3", "Kia Soul",
    "Hyundai Ioniq", "Volvo XC40", "Nissan Leaf", "Fiat Panda", "Renault Clio", "Skoda Octavia",
    "Jeep Wrangler", "Mini Cooper", "BMW i3", "Audi A4", "Toyota Prius", "Honda Jazz",
    "Peugeot 208", "Ford Mustang", "Subaru Forester",
)
SUBJECTS = (
    "law", "medicine", "economics", "philosophy", "mathematics", "psychology", "marine biology",
    "statistics", "linguistics", "Japanese", "Mandarin", "nutrition", "astronomy", "sociology",
    "creative writing", "robotics", "archaeology", "geology", "political science", "music theory",
)
HOBBIES = (
    "painting", "pottery", "rock climbing", "chess", "gardening", "hiking", "knitting", "surfing",
    "yoga", "cycling", "woodworking", "bird watching", "salsa dancing", "kayaking", "archery",
    "fencing", "calligraphy", "origami", "skateboarding", "fishing", "juggling", "sailing",
    "embroidery", "baking",
)
ALLERGENS = (
    "peanuts", "shellfish", "gluten", "pollen", "penicillin", "latex", "soy", "eggs", "dairy",
    "sesame", "strawberries", "mold", "walnuts", "mustard",
)
RELATIONS = (
    "cousin", "best friend", "coworker", "neighbor", "roommate", "mentor", "childhood friend",
    "teammate", "landlord", "classmate",
)


# ---------------------------------------------------------------------------------------------
# Templates. Facts are third person; utterances are first person (the speaker's own facts) or
# name a third party ("my sister Maya"). Fields: s (subject name), v / old / new (values),
# a_v / a_old / a_new (values with their indefinite article), name and rel (third party),
# kind and a_kind (pet species).
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _SingleSpec:
    """A single-valued attribute: its values, facts, questions and utterance paraphrases."""

    attr: str
    pool: tuple[str, ...]
    retractable: bool
    fact: str
    fact_update: str
    fact_retract: str
    q_current: str
    q_previous: str
    q_when: str
    say_intro: tuple[str, ...]
    say_update: tuple[str, ...]
    say_reaffirm: tuple[str, ...]
    say_retract: tuple[str, ...] = ()
    say_intro_3p: tuple[str, ...] = ()
    say_update_3p: tuple[str, ...] = ()
    say_reaffirm_3p: tuple[str, ...] = ()
    unique_values: bool = False  # values are people: never reused within a conversation


@dataclass(frozen=True)
class _SetSpec:
    """A set-valued attribute (one memory per member)."""

    attr: str
    pool: tuple[str, ...]
    fact_add: str
    fact_remove: str
    q_set: str
    q_count: str
    q_when: str
    say_have: tuple[str, ...]  # a member the speaker already had (introduction)
    say_new: tuple[str, ...]  # a member just acquired (dated: has a "when" question)
    say_remove: tuple[str, ...]
    say_reaffirm: tuple[str, ...]
    say_second: tuple[str, ...] = ()  # another member of a kind already in the set
    kinds: tuple[str, ...] = ()
    new_sentiment: str = "positive"
    remove_sentiment: str = "negative"


SINGLE_SPECS: dict[str, _SingleSpec] = {
    s.attr: s
    for s in (
        _SingleSpec(
            attr="city",
            pool=CITIES,
            retractable=False,
            fact="{s} lives in {v}.",
            fact_update="{s} now lives in {new}. {s} previously lived in {old}.",
            fact_retract="",
            q_current="Where does {s} live?",
            q_previous="Where did {s} live previously?",
            q_when="When did {s} move to {new}?",
            say_intro=(
                "I live in {v}.",
                "I've been living in {v} for a few years now.",
                "These days I'm based in {v}, and I love it.",
                "Home for me is {v}, right near the old town.",
            ),
            say_update=(
                "Big news: we moved from {old} to {new}!",
                "I finally left {old}. I live in {new} now.",
                "Moving day is over, goodbye {old}, hello {new}!",
            ),
            say_reaffirm=(
                "I'm still in {v}, it really feels like home.",
                "Still living in {v}, nothing new on that front.",
            ),
            say_intro_3p=(
                "My {rel} {name} lives in {v}.",
                "{name} lives in {v}, so I visit whenever I can.",
            ),
            say_update_3p=(
                "My {rel} {name} just moved from {old} to {new}.",
                "{name} left {old} and lives in {new} now.",
            ),
            say_reaffirm_3p=("{name} is still living in {v}.", "My {rel} {name} still lives in {v}."),
        ),
        _SingleSpec(
            attr="job",
            pool=JOBS,
            retractable=True,
            fact="{s} works as {a_v}.",
            fact_update="{s} now works as {a_new}. {s} previously worked as {a_old}.",
            fact_retract="{s} no longer works as {a_v}.",
            q_current="What does {s} work as?",
            q_previous="What did {s} work as previously?",
            q_when="When did {s} start working as {a_new}?",
            say_intro=(
                "I work as {a_v}.",
                "I'm {a_v}, have been for a while now.",
                "My day job? I work as {a_v}.",
            ),
            say_update=(
                "I quit being {a_old} and started working as {a_new}!",
                "Career change: I'm no longer {a_old}, I work as {a_new} now.",
                "After years as {a_old}, I switched to working as {a_new}.",
            ),
            say_reaffirm=("Still working as {a_v}, busy as ever.", "I'm still {a_v}, and I still enjoy it."),
            say_retract=(
                "I quit my job as {a_v}, so I'm not working right now.",
                "I left my {v} job last week and I'm taking a break from work.",
            ),
            say_intro_3p=("My {rel} {name} works as {a_v}.", "{name} is {a_v}, and loves it."),
            say_update_3p=(
                "{name} switched careers, from {old} to {new}.",
                "My {rel} {name} stopped working as {a_old} and is {a_new} now.",
            ),
            say_reaffirm_3p=("{name} is still working as {a_v}.",),
        ),
        _SingleSpec(
            attr="partner",
            pool=PARTNER_NAMES,
            retractable=True,
            unique_values=True,
            fact="{s} is dating {v}.",
            fact_update="{s} is now dating {new}. {s} previously dated {old}.",
            fact_retract="{s} is no longer dating {v}.",
            q_current="Who is {s} dating?",
            q_previous="Who did {s} date previously?",
            q_when="When did {s} start dating {new}?",
            say_intro=(
                "I'm dating {v}, we met last year.",
                "My partner {v} and I have been together for a while now.",
                "{v} and I are dating, it's going really well.",
            ),
            say_update=(
                "{old} and I broke up, and now I'm seeing {new}!",
                "I'm dating {new} now, things with {old} didn't work out.",
            ),
            say_reaffirm=("{v} and I are still going strong.", "Still dating {v}, we just celebrated our anniversary."),
            say_retract=("{v} and I broke up, I'm single again.", "I'm not seeing {v} anymore, we split up."),
            say_intro_3p=("My {rel} {name} is dating {v}.", "{name} has been seeing {v} for a while."),
            say_update_3p=("{name} broke up with {old} and is dating {new} now.",),
            say_reaffirm_3p=("{name} and {v} are still together.",),
        ),
        _SingleSpec(
            attr="car",
            pool=CARS,
            retractable=True,
            fact="{s}'s car is {a_v}.",
            fact_update="{s}'s car is now {a_new}. {s}'s previous car was {a_old}.",
            fact_retract="{s} no longer has a car.",
            q_current="What car does {s} drive?",
            q_previous="What was {s}'s previous car?",
            q_when="When did {s} get the {new}?",
            say_intro=("I drive {a_v}.", "My car is {a_v}, it's been very reliable.", "I got {a_v} a while back."),
            say_update=("I traded in my {old} for {a_new}!", "I sold the {old} and bought {a_new}."),
            say_reaffirm=("My {v} is still running great.", "Still driving the {v}, no plans to change."),
            say_retract=(
                "I sold my {v}, so no car for me anymore.",
                "My {v} is gone, I sold it and take the bus now.",
            ),
            say_intro_3p=("My {rel} {name} drives {a_v}.", "{name} got {a_v} a while back."),
            say_update_3p=("{name} traded in the {old} for {a_new}.",),
            say_reaffirm_3p=("{name} still drives the {v}.",),
        ),
        _SingleSpec(
            attr="study",
            pool=SUBJECTS,
            retractable=True,
            fact="{s} is studying {v}.",
            fact_update="{s} is now studying {new}. {s} previously studied {old}.",
            fact_retract="{s} is no longer studying {v}.",
            q_current="What is {s} studying?",
            q_previous="What did {s} study previously?",
            q_when="When did {s} start studying {new}?",
            say_intro=(
                "I'm studying {v} part-time.",
                "I've been taking evening classes in {v}.",
                "I'm studying {v} these days.",
            ),
            say_update=(
                "I switched from {old} to {new}, it suits me better.",
                "I dropped {old} and started studying {new}.",
            ),
            say_reaffirm=("Still studying {v}, exams are coming up.",),
            say_retract=(
                "I finished my {v} course, no more classes for me.",
                "I stopped studying {v}, it was too much with everything else.",
            ),
            say_intro_3p=("My {rel} {name} is studying {v}.", "{name} is taking classes in {v}."),
            say_update_3p=("{name} switched from {old} to {new} at university.",),
            say_reaffirm_3p=("{name} is still studying {v}.",),
        ),
    )
}

SET_SPECS: dict[str, _SetSpec] = {
    s.attr: s
    for s in (
        _SetSpec(
            attr="pets",
            pool=PET_NAMES,
            kinds=SPECIES,
            fact_add="{s} has a pet {kind} named {v}.",
            fact_remove="{s} no longer has a pet named {v}.",
            q_set="What are the names of {s}'s pets?",
            q_count="How many pets does {s} have?",
            q_when="When did {s} adopt {v}?",
            say_have=("I have {a_kind} named {v}.", "My {kind} {v} keeps me company at home."),
            say_new=("We just adopted {a_kind} called {v}!", "Meet the newest family member: {a_kind} named {v}."),
            say_second=("We got a second {kind}, {v}!", "We added another {kind} to the family, {v}."),
            say_remove=("Sadly, my {kind} {v} passed away.", "We had to rehome {v}, our {kind}."),
            say_reaffirm=("{v} the {kind} is doing great.", "My {kind} {v} is as lively as ever."),
        ),
        _SetSpec(
            attr="hobbies",
            pool=HOBBIES,
            fact_add="{s} enjoys {v} as a hobby.",
            fact_remove="{s} no longer enjoys {v}.",
            q_set="What hobbies does {s} enjoy?",
            q_count="How many hobbies does {s} enjoy?",
            q_when="When did {s} take up {v}?",
            say_have=("I really enjoy {v} in my free time.", "{v} is my favourite way to unwind."),
            say_new=("I've taken up {v} recently!", "I just got into {v}, it's so much fun."),
            say_remove=("I gave up {v}, I lost interest.", "I don't do {v} anymore."),
            say_reaffirm=("Still enjoying {v} every weekend.", "{v} is still a big part of my week."),
        ),
        _SetSpec(
            attr="allergies",
            pool=ALLERGENS,
            fact_add="{s} is allergic to {v}.",
            fact_remove="{s} is no longer allergic to {v}.",
            q_set="What is {s} allergic to?",
            q_count="How many things is {s} allergic to?",
            q_when="When did {s} find out about being allergic to {v}?",
            say_have=("I'm allergic to {v}, so I have to be careful.", "Just so you know, I have an allergy to {v}."),
            say_new=("Turns out I'm allergic to {v}, the doctor just told me.", "I found out I have an allergy to {v}."),
            say_remove=("Good news: I'm not allergic to {v} anymore.", "My allergy to {v} is gone, the doctor confirmed it."),
            say_reaffirm=("Still have to avoid {v}, the allergy hasn't changed.",),
            new_sentiment="negative",
            remove_sentiment="positive",
        ),
    )
}

RELATION_FACT = "{name} is {s}'s {rel}."
RELATION_QUESTION = "Who is {s}'s {rel}?"
SAY_RELATION = (
    "My {rel} {name} is coming to visit soon.",
    "Have I told you about my {rel} {name}?",
    "I had dinner with my {rel} {name} last night.",
)

GREETINGS = ("Hi {other}!", "Hey {other}, good to see you.", "Hello again, {other}!")
FAREWELLS = ("Anyway, I should go. Talk soon!", "Great catching up, bye for now!", "I have to run, see you next time!")
ACKS = {
    "positive": ("That's great news!", "Congratulations!", "Oh nice, good for you!", "Wow, how exciting!"),
    "negative": ("Oh no, I'm sorry to hear that.", "That's a shame.", "Sorry, that must be hard."),
    "neutral": ("Good to know.", "Nice!", "Glad to hear it.", "Ah, I remember you mentioning that."),
}
CHITCHAT = (
    "How has your week been?",
    "The weather has been so unpredictable lately.",
    "I watched a great documentary last night.",
    "Did you catch the game on Sunday?",
    "I've been trying to get more sleep.",
    "Traffic was terrible this morning.",
    "I finally finished that book I was reading.",
    "What are your plans for the weekend?",
    "I could really use a vacation.",
    "I'm still thinking about what to cook tonight.",
    "I've always wanted to visit {city}.",
    "A friend of mine keeps talking about {city}.",
    "Have you ever tried {hobby}?",
    "I read an article about {subject} yesterday.",
    "I saw a cute {kind} at the park today.",
    "I saw a vintage {car} on the street today.",
)


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SyntheticConfig:
    """Knobs of the synthetic task generator. The defaults give 40 sessions of 8-12 turns."""

    num_sessions: int = 40
    """Number of sessions in a conversation (the env's horizon is at most this)."""
    turns_per_session: tuple[int, int] = (8, 12)
    """Inclusive range from which each session draws its number of turns (an int fixes it)."""
    num_third_parties: int = 4
    """Relatives and friends the two speakers talk about (split between them)."""
    shared_attributes: tuple[str, ...] = ("city", "job")
    """Single-valued attributes that third parties have too, so several entities share them."""
    introduce_rate: float = 0.35
    """Weight of introducing a new fact, while some are left to introduce."""
    update_rate: float = 0.30
    """Weight of replacing a single value (UPDATE)."""
    add_rate: float = 0.15
    """Weight of adding a member to a set (ADD, e.g. a second dog)."""
    delete_rate: float = 0.12
    """Weight of retracting a value or removing a set member (DELETE)."""
    reaffirm_rate: float = 0.15
    """Weight of restating a known value (NOOP)."""
    distractor_rate: float = 0.4
    """Probability that a turn carries no fact (chit-chat or a bare acknowledgement)."""
    ack_rate: float = 0.5
    """Probability that a turn first acknowledges the other speaker's fact from the turn before."""
    max_set_size: int = 4
    """Largest number of members a set (pets, hobbies, allergies) can hold."""
    min_stable_sessions: int = 3
    """Sessions a slot keeps its value (or a set its members) before it may change again."""
    question_delay: int = 0
    """Sessions between the last evidence turn and the session after which a question is asked."""
    abstention_share: float = 0.05
    """Upper bound on the share of abstention questions (an empty memory answers them right)."""
    show_dates: bool = True
    """Whether the env shows session dates; without dates no "when" questions are generated."""
    gap_days: tuple[int, int] = (2, 21)
    """Inclusive range of days between consecutive sessions."""

    def __post_init__(self) -> None:
        turns = self.turns_per_session
        if isinstance(turns, (int, np.integer)):
            turns = (int(turns), int(turns))
        turns = tuple(int(t) for t in turns)
        object.__setattr__(self, "turns_per_session", turns)
        object.__setattr__(self, "shared_attributes", tuple(self.shared_attributes))
        object.__setattr__(self, "gap_days", tuple(int(g) for g in self.gap_days))
        if self.num_sessions < 1:
            raise ValueError(f"num_sessions must be >= 1, got {self.num_sessions}")
        if len(turns) != 2 or not 2 <= turns[0] <= turns[1]:
            raise ValueError(f"turns_per_session must be an int >= 2 or a range (lo, hi) with 2 <= lo <= hi, got {self.turns_per_session}")
        if self.num_third_parties < 0 or self.num_third_parties > len(RELATIONS):
            raise ValueError(f"num_third_parties must be in [0, {len(RELATIONS)}], got {self.num_third_parties}")
        unknown = [a for a in self.shared_attributes if a not in SINGLE_SPECS]
        if unknown:
            raise ValueError(f"unknown shared attributes {unknown}; known: {sorted(SINGLE_SPECS)}")
        for name in ("introduce_rate", "update_rate", "add_rate", "delete_rate", "reaffirm_rate", "distractor_rate", "ack_rate", "abstention_share"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        if self.min_stable_sessions < 1:
            raise ValueError(f"min_stable_sessions must be >= 1, got {self.min_stable_sessions}")
        if self.max_set_size < 1:
            raise ValueError(f"max_set_size must be >= 1, got {self.max_set_size}")
        if self.question_delay < 0:
            raise ValueError(f"question_delay must be >= 0, got {self.question_delay}")
        if len(self.gap_days) != 2 or not 1 <= self.gap_days[0] <= self.gap_days[1]:
            raise ValueError(f"gap_days must be a range (lo, hi) with 1 <= lo <= hi, got {self.gap_days}")


# ---------------------------------------------------------------------------------------------
# World state
# ---------------------------------------------------------------------------------------------


@dataclass
class _Single:
    """State of one single-valued slot."""

    key: str
    spec: _SingleSpec
    value: str | None = None
    prev: str | None = None  # the value the latest UPDATE replaced (None after an ADD)
    dia: str = ""  # turn that set the current value
    session: int = 0
    retract_dia: str = ""  # turn of the latest retraction, while the slot is empty
    retract_session: int = 0
    history: list[str] = field(default_factory=list)


@dataclass
class _Member:
    value: str
    kind: str
    dia: str
    session: int
    acquired: bool  # "we just adopted ...": the acquisition is dated


@dataclass
class _SetSlot:
    """State of one set-valued slot; members are kept in order of addition."""

    key: str
    spec: _SetSpec
    members: dict[str, _Member] = field(default_factory=dict)
    history: list[str] = field(default_factory=list)
    remove_dia: str = ""
    remove_session: int = 0
    changed: int = 0  # session of the latest addition or removal


@dataclass
class _Entity:
    name: str
    owner: str | None = None  # the speaker who talks about this third party (None: a speaker)
    rel: str = ""
    introduced: bool = True
    rel_dia: str = ""
    singles: dict[str, _Single] = field(default_factory=dict)
    sets: dict[str, _SetSlot] = field(default_factory=dict)

    @property
    def is_speaker(self) -> bool:
        return self.owner is None


@dataclass(frozen=True)
class _Event:
    kind: str  # introduce | update | add | delete | reaffirm
    entity: _Entity
    slot: _Single | _SetSlot | None = None  # None: a third party is introduced
    member: str = ""  # the member removed or restated


def _article(word: str) -> str:
    return ("an " if word[:1].lower() in "aeiou" else "a ") + word


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _format_date(day: _dt.date) -> str:
    return f"{day.day} {_MONTHS[day.month - 1]} {day.year}"


# ---------------------------------------------------------------------------------------------
# The generator
# ---------------------------------------------------------------------------------------------


class _Generator:
    """Simulates one conversation. Used once, by :func:`generate_conversation`."""

    def __init__(self, seed: int, config: SyntheticConfig, conv_id: str) -> None:
        self.cfg = config
        self.conv_id = conv_id
        self.rng = np.random.default_rng(seed)
        self.used_names: set[str] = set()  # people and pets named so far (never reused)
        names = self._sample(PERSON_NAMES, 2 + config.num_third_parties)
        self.speakers = (names[0], names[1])
        self.entities: list[_Entity] = []
        for name in self.speakers:
            ent = _Entity(name)
            ent.singles = {a: _Single(f"{name}|{a}", spec) for a, spec in SINGLE_SPECS.items()}
            ent.sets = {a: _SetSlot(f"{name}|{a}", spec) for a, spec in SET_SPECS.items()}
            self.entities.append(ent)
        relations = self._sample(RELATIONS, config.num_third_parties)
        for i, (name, rel) in enumerate(zip(names[2:], relations)):
            ent = _Entity(name, owner=self.speakers[i % 2], rel=rel, introduced=False)
            ent.singles = {a: _Single(f"{name}|{a}", SINGLE_SPECS[a]) for a in config.shared_attributes}
            self.entities.append(ent)
        self.dates: list[str] = []
        self.turns_by_session: list[tuple[Turn, ...]] = []
        self.gold: list[GoldOp] = []

    # -- random helpers ------------------------------------------------------------------

    def _pick(self, items):
        return items[int(self.rng.integers(len(items)))]

    def _sample(self, items, n: int) -> list:
        idx = self.rng.choice(len(items), size=n, replace=False)
        return [items[int(i)] for i in idx]

    def _fresh(self, pool: tuple[str, ...], history: list[str], unique: bool) -> list[str]:
        """Values of ``pool`` this slot never held (and, for names, nobody in the conversation)."""
        return [v for v in pool if v not in history and not (unique and v in self.used_names)]

    # -- events --------------------------------------------------------------------------

    def _candidates(self, speaker: str, session: int, touched: set[str]) -> dict[str, list[_Event]]:
        """Every event the speaker could bring up now, by kind."""
        cands: dict[str, list[_Event]] = {k: [] for k in ("introduce", "update", "add", "delete", "reaffirm")}
        settle = self.cfg.min_stable_sessions
        for ent in self.entities:
            if ent.name != speaker and ent.owner != speaker:
                continue
            if not ent.introduced:
                cands["introduce"].append(_Event("introduce", ent))
                continue
            for slot in ent.singles.values():
                if slot.key in touched:
                    continue
                if slot.value is None:
                    if not slot.retract_dia or session - slot.retract_session >= settle:
                        if self._fresh(slot.spec.pool, slot.history, slot.spec.unique_values):
                            cands["introduce"].append(_Event("introduce", ent, slot))
                    continue
                cands["reaffirm"].append(_Event("reaffirm", ent, slot))
                if session - slot.session < settle:
                    continue
                if self._fresh(slot.spec.pool, slot.history, slot.spec.unique_values):
                    cands["update"].append(_Event("update", ent, slot))
                if slot.spec.retractable and ent.is_speaker:
                    cands["delete"].append(_Event("delete", ent, slot))
            for st in ent.sets.values():
                if st.key in touched:
                    continue
                has_room = len(st.members) < self.cfg.max_set_size and self._fresh(st.spec.pool, st.history, True)
                if not st.history and has_room:
                    cands["introduce"].append(_Event("introduce", ent, st))
                for member in st.members:
                    cands["reaffirm"].append(_Event("reaffirm", ent, st, member))
                if st.history and session - st.changed < settle:
                    continue
                if has_room:
                    cands["add"].append(_Event("add", ent, st))
                for member in st.members:
                    cands["delete"].append(_Event("delete", ent, st, member))
        return cands

    def _pick_event(self, speaker: str, session: int, touched: set[str]) -> _Event | None:
        cands = self._candidates(speaker, session, touched)
        cfg = self.cfg
        weights = {
            "introduce": cfg.introduce_rate,
            "update": cfg.update_rate,
            "add": cfg.add_rate,
            "delete": cfg.delete_rate,
            "reaffirm": cfg.reaffirm_rate,
        }
        kinds = [k for k in weights if cands[k] and weights[k] > 0]
        if not kinds:
            return None
        w = np.array([weights[k] for k in kinds], dtype=float)
        kind = kinds[int(self.rng.choice(len(kinds), p=w / w.sum()))]
        return self._pick(cands[kind])

    def _apply(self, ev: _Event, speaker: str, dia: str, session: int) -> tuple[str, GoldOp, str]:
        """Apply an event to the world; return the utterance, its gold op and the sentiment."""
        ent = ev.entity
        fields = {"s": ent.name, "name": ent.name, "rel": ent.rel}
        if ev.slot is None:  # a third party is introduced through the relation
            ent.introduced, ent.rel_dia = True, dia
            fact = RELATION_FACT.format(**{**fields, "s": ent.owner})
            say = self._pick(SAY_RELATION).format(**fields)
            return say, GoldOp(dia, speaker, fact, OP_ADD, f"{ent.name}|relation", fact, "introduce"), "neutral"
        if isinstance(ev.slot, _Single):
            return self._apply_single(ev, ev.slot, fields, speaker, dia, session)
        return self._apply_set(ev, ev.slot, fields, speaker, dia, session)

    def _apply_single(self, ev: _Event, slot: _Single, fields: dict, speaker: str, dia: str, session: int):
        spec, ent = slot.spec, ev.entity
        third = not ent.is_speaker
        if ev.kind in ("introduce", "update"):
            new = self._pick(self._fresh(spec.pool, slot.history, spec.unique_values))
            old = slot.value
            fields.update(v=new, a_v=_article(new), new=new, a_new=_article(new))
            if ev.kind == "update":
                fields.update(old=old, a_old=_article(old))
                fact, op = spec.fact_update.format(**fields), OP_UPDATE
                say = self._pick(spec.say_update_3p if third else spec.say_update)
                sentiment = "positive"
            else:
                fact, op = spec.fact.format(**fields), OP_ADD
                say = self._pick(spec.say_intro_3p if third else spec.say_intro)
                sentiment = "neutral"
            slot.value, slot.prev, slot.dia, slot.session = new, old, dia, session
            slot.retract_dia, slot.retract_session = "", 0
            slot.history.append(new)
            if spec.unique_values:
                self.used_names.add(new)
            return say.format(**fields), GoldOp(dia, speaker, fact, op, slot.key, fact, ev.kind), sentiment
        fields.update(v=slot.value, a_v=_article(slot.value))
        if ev.kind == "delete":
            fact = spec.fact_retract.format(**fields)
            say = self._pick(spec.say_retract)
            slot.value, slot.prev, slot.dia, slot.session = None, None, "", 0
            slot.retract_dia, slot.retract_session = dia, session
            return say.format(**fields), GoldOp(dia, speaker, fact, OP_DELETE, slot.key, "", "retract"), "negative"
        fact = spec.fact.format(**fields)  # reaffirm: the plain current value
        say = self._pick(spec.say_reaffirm_3p if third else spec.say_reaffirm)
        return say.format(**fields), GoldOp(dia, speaker, fact, OP_NOOP, slot.key, "", "reaffirm"), "neutral"

    def _apply_set(self, ev: _Event, st: _SetSlot, fields: dict, speaker: str, dia: str, session: int):
        spec = st.spec
        if ev.kind in ("introduce", "add"):
            value = self._pick(self._fresh(spec.pool, st.history, True))
            kinds_held = sorted({m.kind for m in st.members.values() if m.kind})
            kind = ""
            if spec.kinds:
                kind = self._pick(kinds_held) if kinds_held and self.rng.random() < 0.4 else self._pick(spec.kinds)
            fields.update(v=value, kind=kind, a_kind=_article(kind) if kind else "")
            if ev.kind == "introduce":
                templates, sentiment = spec.say_have, "neutral"
            elif kind and kind in kinds_held and spec.say_second:
                templates, sentiment = spec.say_second, spec.new_sentiment  # complementary, not a replacement
            else:
                templates, sentiment = spec.say_new, spec.new_sentiment
            st.members[value] = _Member(value, kind, dia, session, acquired=ev.kind == "add")
            st.changed = session
            st.history.append(value)
            self.used_names.add(value)
            fact = spec.fact_add.format(**fields)
            op = GoldOp(dia, speaker, fact, OP_ADD, f"{st.key}|{value}", fact, ev.kind)
            return self._pick(templates).format(**fields), op, sentiment
        member = st.members[ev.member]
        fields.update(v=member.value, kind=member.kind, a_kind=_article(member.kind) if member.kind else "")
        if ev.kind == "delete":
            del st.members[member.value]
            st.remove_dia, st.remove_session, st.changed = dia, session, session
            fact = spec.fact_remove.format(**fields)
            op = GoldOp(dia, speaker, fact, OP_DELETE, f"{st.key}|{member.value}", "", "remove")
            return self._pick(spec.say_remove).format(**fields), op, spec.remove_sentiment
        fact = spec.fact_add.format(**fields)
        op = GoldOp(dia, speaker, fact, OP_NOOP, f"{st.key}|{member.value}", "", "reaffirm")
        return self._pick(spec.say_reaffirm).format(**fields), op, "neutral"

    # -- dialogue ------------------------------------------------------------------------

    def _chitchat(self, used: set[str]) -> str:
        """A distractor line not yet used in this session."""
        line = self._pick([c for c in CHITCHAT if c not in used] or CHITCHAT)
        used.add(line)
        return line.format(
            city=self._pick(CITIES), hobby=self._pick(HOBBIES), subject=self._pick(SUBJECTS),
            kind=self._pick(SPECIES), car=self._pick(CARS),
        )

    def _session(self, s: int) -> tuple[Turn, ...]:
        lo, hi = self.cfg.turns_per_session
        n_turns = int(self.rng.integers(lo, hi + 1))
        opener = (s - 1) % 2
        touched: set[str] = set()
        chitchat_used: set[str] = set()
        prev: tuple[int, str] | None = None  # (speaker index, sentiment) of the last fact turn
        turns = []
        for t in range(1, n_turns + 1):
            who = (opener + t - 1) % 2
            speaker, other = self.speakers[who], self.speakers[1 - who]
            dia = f"D{s}:{t}"
            parts = []
            if t == 1 and self.rng.random() < 0.6:
                parts.append(self._pick(GREETINGS).format(other=other))
            acked = prev is not None and prev[0] != who and self.rng.random() < self.cfg.ack_rate
            if acked:
                parts.append(self._pick(ACKS[prev[1]]))
            event = None
            if self.rng.random() >= self.cfg.distractor_rate:
                event = self._pick_event(speaker, s, touched)
            if event is not None:
                say, op, sentiment = self._apply(event, speaker, dia, s)
                touched.add(op.key if event.slot is None or isinstance(event.slot, _Single) else event.slot.key)
                self.gold.append(op)
                parts.append(_cap(say))
                prev = (who, sentiment)
            else:
                if t == n_turns:
                    parts.append(self._pick(FAREWELLS))
                elif not acked or self.rng.random() < 0.5:
                    parts.append(self._chitchat(chitchat_used))
                prev = None
            turns.append(Turn(speaker, dia, " ".join(parts)))
        return tuple(turns)

    # -- questions -----------------------------------------------------------------------

    def _question_state(self) -> dict[tuple, tuple[str, str, str, tuple[str, ...]]]:
        """Questions the current world supports: slot -> (category, question, answer, evidence)."""
        out: dict[tuple, tuple[str, str, str, tuple[str, ...]]] = {}
        show_when = self.cfg.show_dates
        for ent in self.entities:
            if not ent.introduced:
                continue
            s = ent.name
            if not ent.is_speaker:
                q = RELATION_QUESTION.format(s=ent.owner, rel=ent.rel)
                out[("relation", s)] = (CURRENT, q, ent.name, (ent.rel_dia,))
            for slot in ent.singles.values():
                spec = slot.spec
                if slot.value is not None:
                    out[("current", slot.key)] = (CURRENT, spec.q_current.format(s=s), slot.value, (slot.dia,))
                    if slot.prev is not None:
                        out[("previous", slot.key)] = (PREVIOUS, spec.q_previous.format(s=s), slot.prev, (slot.dia,))
                        if show_when:
                            q = spec.q_when.format(s=s, new=slot.value, a_new=_article(slot.value))
                            out[("when", slot.key)] = (WHEN, q, self.dates[slot.session - 1], (slot.dia,))
                elif slot.retract_dia:
                    out[("current", slot.key)] = (ABSTENTION, spec.q_current.format(s=s), NONE_ANSWER, (slot.retract_dia,))
            for st in ent.sets.values():
                spec = st.spec
                members = list(st.members.values())
                if members:
                    evidence = [m.dia for m in members]
                    if st.remove_dia and st.remove_session >= max(m.session for m in members):
                        evidence.append(st.remove_dia)
                    ev = tuple(evidence)
                    out[("set", st.key)] = (SET, spec.q_set.format(s=s), ", ".join(m.value for m in members), ev)
                    out[("count", st.key)] = (COUNT, spec.q_count.format(s=s), str(len(members)), ev)
                    for m in members:
                        if m.acquired and show_when:
                            q = spec.q_when.format(s=s, v=m.value)
                            out[("when", st.key, m.value)] = (WHEN, q, self.dates[m.session - 1], (m.dia,))
                elif st.history:
                    out[("set", st.key)] = (ABSTENTION, spec.q_set.format(s=s), NONE_ANSWER, (st.remove_dia,))
        return out

    def _close(self, item, valid_until: int | None, out: list) -> None:
        category, question, answer, evidence = item
        order = sorted(evidence, key=parse_dia_id)
        asked = max(parse_dia_id(d)[0] for d in order) + self.cfg.question_delay
        if asked > self.cfg.num_sessions or (valid_until is not None and asked > valid_until):
            return  # the answer changed before the question would be asked
        out.append((category, question, answer, tuple(order), asked, valid_until))

    # -- driver --------------------------------------------------------------------------

    def run(self) -> Conversation:
        cfg = self.cfg
        day = _dt.date(2022, 1, 1) + _dt.timedelta(days=int(self.rng.integers(0, 730)))
        open_q: dict[tuple, tuple] = {}
        closed: list[tuple] = []
        for s in range(1, cfg.num_sessions + 1):
            if s > 1:
                day += _dt.timedelta(days=int(self.rng.integers(cfg.gap_days[0], cfg.gap_days[1] + 1)))
            self.dates.append(_format_date(day))
            self.turns_by_session.append(self._session(s))
            state = self._question_state()
            for slot in list(open_q):
                if slot not in state or state[slot][:3] != open_q[slot][:3]:
                    self._close(open_q.pop(slot), s - 1, closed)
            for slot, item in state.items():
                open_q.setdefault(slot, item)
        for item in open_q.values():
            self._close(item, None, closed)
        questions = self._finish_questions(closed)
        sessions = tuple(Session(i + 1, d, t) for i, (d, t) in enumerate(zip(self.dates, self.turns_by_session)))
        meta = (("show_dates", "1" if cfg.show_dates else "0"), ("generator", "memenv.synthetic"))
        return Conversation(self.conv_id, self.speakers, sessions, questions, tuple(self.gold), "synthetic", meta)

    def _finish_questions(self, items: list[tuple]) -> tuple[QAItem, ...]:
        """Cap the abstention share, order by the session the question is asked, assign ids."""
        abstain = [i for i, it in enumerate(items) if it[0] == ABSTENTION]
        others = len(items) - len(abstain)
        share = self.cfg.abstention_share
        cap = int(share * others / (1.0 - share)) if share < 1.0 else len(abstain)
        if len(abstain) > cap:
            drop = set(int(i) for i in self.rng.choice(abstain, size=len(abstain) - cap, replace=False))
            items = [it for i, it in enumerate(items) if i not in drop]
        items = sorted(items, key=lambda it: it[4])  # stable: keeps creation order within a session
        return tuple(
            QAItem(f"{self.conv_id}:q{i}", q, a, ev, cat, asked, valid_until)
            for i, (cat, q, a, ev, asked, valid_until) in enumerate(items)
        )


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


def _check_seed(seed: object) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


def generate_conversation(seed: int, config: SyntheticConfig | None = None, conv_id: str | None = None) -> Conversation:
    """Generate one synthetic conversation with its gold operation log and questions.

    Args:
        seed: a non-negative integer; the same seed and config give an identical conversation.
        config: the generator's knobs (default :class:`SyntheticConfig`).
        conv_id: the conversation id (default ``f"syn-{seed}"``); question ids are
            ``f"{conv_id}:q{i}"``.

    Returns:
        A :class:`~memenv.types.Conversation` with ``source="synthetic"`` whose ``meta`` holds
        ``("show_dates", "1" | "0")``.
    """
    seed = _check_seed(seed)
    config = SyntheticConfig() if config is None else config
    if not isinstance(config, SyntheticConfig):
        raise TypeError(f"config must be a SyntheticConfig, got {type(config).__name__}")
    return _Generator(seed, config, conv_id if conv_id is not None else f"syn-{seed}").run()


def generate_conversations(n: int, seed: int = 0, config: SyntheticConfig | None = None) -> list[Conversation]:
    """Generate ``n`` conversations; conversation ``i`` is ``syn-{seed}-{i}``.

    Its seed is derived from ``(seed, i)`` with :class:`numpy.random.SeedSequence`, so the list
    is reproducible and each conversation is independent of ``n``.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    seed = _check_seed(seed)
    out = []
    for i in range(n):
        child = int(np.random.SeedSequence([seed, i]).generate_state(1, dtype=np.uint64)[0])
        out.append(generate_conversation(child, config, conv_id=f"syn-{seed}-{i}"))
    return out
