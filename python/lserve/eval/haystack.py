"""Seeded filler text for passkey / needle-in-a-haystack prompts (evaluation and calibration).

Sentences are drawn from small word lists with a caller-owned `random.Random`, so a seed fixes the
text exactly. The text is varied (not one sentence repeated) but carries no digits, so a passkey is
the only number in a prompt.

Example:
    >>> import random
    >>> filler_sentence(random.Random(0))
    'The clever clockmaker painted the harbour during the storm.'
"""
from __future__ import annotations

import random
from typing import List

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
