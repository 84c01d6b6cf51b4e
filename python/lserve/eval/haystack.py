"""Seeded filler text for passkey / needle-in-a-haystack prompts (evaluation and calibration).

Sentences are drawn from small word lists with a caller-owned `random.Random`, so a seed fixes the
text exactly. The text is varied (not one sentence repeated) but carries no digits, so a passkey is
the only number in a prompt. `filler_sentence` is the story-like source of `lserve eval niah` and
calibration (its output must not change); `haystack_paragraph` mixes it with four more generated
sources (essay, nature, notes, dialogue) for `lserve eval retrieval`. No source has digits,
hyphens or words in capitals beyond a sentence's first letter (tests/eval/test_retrieval_tasks.py).

Example:
    >>> import random
    >>> filler_sentence(random.Random(0))
    'The clever clockmaker painted the harbour during the storm.'
    >>> source, sentences = haystack_paragraph(random.Random(1))
"""
from __future__ import annotations

import random
from typing import Callable, Dict, List, Tuple

_ADJECTIVES = ("quiet", "old", "young", "patient", "tired", "curious", "cheerful", "careful", "busy", "gentle",
               "proud", "silent", "clever", "restless", "humble")
_SUBJECTS = ("painter", "farmer", "sailor", "teacher", "baker", "traveller", "gardener", "merchant", "student",
             "doctor", "fisherman", "poet", "carpenter", "shepherd", "clockmaker")
_VERBS = ("walked past", "looked at", "thought about", "returned to", "wrote about", "cleaned", "painted",
          "visited", "described", "waited near", "sang about", "repaired", "watched", "forgot", "admired")
_OBJECTS = ("the harbour", "a small bridge", "the mountain road", "an empty market", "the village square",
            "a wooden boat", "the library", "a field of wheat", "the river bank", "an old lighthouse",
            "the orchard", "a narrow street", "the train station", "a stone wall", "the green valley")
_TIMES = ("before the rain", "at dawn", "in the evening", "after lunch", "during the storm", "in early spring",
          "late at night", "on a windy day", "before the festival", "under a grey sky", "in the summer heat",
          "after the long winter")
_REMARKS = ("The grass is green and the sky is blue.", "Nothing unusual happened that day.",
            "The wind carried the smell of salt.", "Somewhere a dog was barking.",
            "Life in the town moved slowly.", "The bells rang once and then fell silent.",
            "Clouds drifted over the hills.", "Everyone agreed it was a fine season.")


def filler_sentence(rng: random.Random) -> str:
    """One filler sentence (no digits)."""
    if rng.random() < 0.15:
        return rng.choice(_REMARKS)
    return (f"The {rng.choice(_ADJECTIVES)} {rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} "
            f"{rng.choice(_OBJECTS)} {rng.choice(_TIMES)}.")


def filler_sentences(rng: random.Random, num_sentences: int) -> List[str]:
    """`num_sentences` filler sentences drawn from `rng`."""
    return [filler_sentence(rng) for _ in range(num_sentences)]


# ---- more sources for `lserve eval retrieval` -------------------------------------------------

_TOPICS = ("patience", "public education", "good design", "honest work", "city planning", "local trade",
           "careful reading", "shared meals", "long walks", "small gardens", "quiet study", "fair rules",
           "common sense", "craftsmanship", "open debate", "good manners", "plain language", "daily routine")
_THINKERS = ("writers", "teachers", "critics", "historians", "engineers", "philosophers", "economists",
             "parents", "scholars", "journalists", "architects", "neighbours")
_FACTORS = ("habit", "trust", "timing", "circumstance", "memory", "attention", "tradition", "practice",
            "luck", "cooperation", "money", "weather")
_OUTCOMES = ("confusion", "waste", "boredom", "quarrels", "delay", "disappointment", "pride", "comfort",
             "surprise", "progress")
_GROUPS = ("ordinary people", "young workers", "older readers", "small towns", "busy families",
           "new students", "shopkeepers", "travellers")
_ESSAY = (
    "Many {thinker} argue that {topic} matters more than {topic2}.",
    "{Topic} is rarely as simple as it first appears.",
    "In practice, {topic} depends on {factor} and on {factor2}.",
    "The history of {topic} shows how slowly habits change among {group}.",
    "Critics point out that {topic} can also lead to {outcome}.",
    "It is worth asking why {topic} became so important to {group}.",
    "Some {thinker} say that {factor} explains most of it, while others blame {factor2}.",
    "When {group} talk about {topic}, they usually mean something about {factor}.",
    "A careful look at {topic} rewards anyone with a little {factor}.",
    "Without {topic}, {group} would face more {outcome} than they expect.",
)
_PLACES = ("the meadow", "the ridge", "the marsh", "the forest edge", "the high pasture", "the gorge",
           "the pine wood", "the sand dunes", "the lake shore", "the moor", "the hillside", "the cove")
_PLANTS = ("ferns", "reeds", "wild roses", "thistles", "willows", "mosses", "heather", "birches",
           "clover", "poppies", "nettles", "rushes")
_ANIMALS = ("swallows", "deer", "geese", "herons", "bees", "foxes", "hares", "crows", "moths", "trout",
            "sparrows", "badgers")
_WATERS = ("stream", "pond", "waterfall", "creek", "spring", "brook", "lake", "estuary")
_SEASONS = ("spring", "summer", "autumn", "winter", "the dry season", "the wet season")
_SMELLS = ("wet earth", "pine resin", "smoke", "cut grass", "salt", "rain", "honey", "mud")
_NATURE = (
    "Beyond {place}, {plants} grow along the {water}.",
    "In {season}, the {animals} return to {place}.",
    "The air near the {water} smells of {smell}.",
    "{Plants} cover the slopes above {place}.",
    "Walkers often stop by the {water} to rest before crossing {place}.",
    "At dusk the {animals} gather near the {water}, and the light fades over {place}.",
    "Nobody can say how long the {plants} have grown around {place}.",
    "The path to {place} is muddy in {season} and dusty the rest of the year.",
)
_ROLES = ("the chair", "the secretary", "a member", "the treasurer", "a visitor", "the organiser",
          "a volunteer", "the speaker")
_ACTIONS = ("repaint the hall", "move the meeting to the evening", "write to the council",
            "collect more chairs", "plan a summer fair", "fix the leaking roof", "buy new curtains",
            "open the garden to visitors", "print a short newsletter", "ask for more volunteers")
_NOTES = (
    "At the meeting, {role} proposed to {action}.",
    "The group agreed to {action} before the end of {season}.",
    "After some discussion, {role} asked whether it was wise to {action}.",
    "The notes record that nobody objected to the plan to {action}.",
    "It was decided to {action}, although {role} had doubts.",
    "Next time the group will also discuss how to {action}.",
)
_SPEAKERS = ("the guide", "the old woman", "the driver", "the boy", "the innkeeper", "the stranger",
             "the nurse", "the cook", "the keeper", "the girl")
_REMARKS_SAID = ("I think the road is longer than it looks", "We should leave before dark",
                 "Nobody remembers who built this place", "The soup is better the second day",
                 "Keep to the left when the path splits", "It always rains when we plan a picnic",
                 "You can hear the sea from the top of the stairs", "Bring a coat, the evenings are cold",
                 "The shop closes early on market days", "Ask at the inn if you get lost")
_DIALOGUE = (
    "\"{remark},\" said {speaker}.",
    "{Speaker} shrugged and said, \"{remark}.\"",
    "\"{remark},\" {speaker} reminded everyone.",
    "Later {speaker} added quietly, \"{remark}.\"",
)


def _fill(rng: random.Random, template: str, fields: Dict[str, Tuple[str, ...]]) -> str:
    """Fills {name} (and {Name}, capitalised) from `fields`; {name2} draws a second, different value."""
    values: Dict[str, str] = {}
    for name, choices in fields.items():
        first = rng.choice(choices)
        second = rng.choice([c for c in choices if c != first])
        values[name], values[name + "2"] = first, second
        values[name.capitalize()] = first[0].upper() + first[1:]
    return template.format(**values)


def essay_sentence(rng: random.Random) -> str:
    return _fill(rng, rng.choice(_ESSAY), {"topic": _TOPICS, "thinker": _THINKERS, "factor": _FACTORS,
                                           "outcome": _OUTCOMES, "group": _GROUPS})


def nature_sentence(rng: random.Random) -> str:
    return _fill(rng, rng.choice(_NATURE), {"place": _PLACES, "plants": _PLANTS, "animals": _ANIMALS,
                                            "water": _WATERS, "season": _SEASONS, "smell": _SMELLS})


def notes_sentence(rng: random.Random) -> str:
    return _fill(rng, rng.choice(_NOTES), {"role": _ROLES, "action": _ACTIONS, "season": _SEASONS})


def dialogue_sentence(rng: random.Random) -> str:
    return _fill(rng, rng.choice(_DIALOGUE), {"remark": _REMARKS_SAID, "speaker": _SPEAKERS})


# Source name -> sentence maker. A paragraph draws all its sentences from one source.
HAYSTACK_SOURCES: Dict[str, Callable[[random.Random], str]] = {
    "story": filler_sentence, "essay": essay_sentence, "nature": nature_sentence, "notes": notes_sentence,
    "dialogue": dialogue_sentence,
}


def haystack_paragraph(rng: random.Random) -> Tuple[str, List[str]]:
    """(source name, 3 to 7 sentences of that source): one paragraph of varied filler."""
    source = rng.choice(sorted(HAYSTACK_SOURCES))
    return source, [HAYSTACK_SOURCES[source](rng) for _ in range(rng.randint(3, 7))]
