"""Rule-based negative captions, NegCLIP-style: the caption with two of its numbers, or else two of its
words, swapped, so that only their order or binding tells it from the original.

NegCLIP (Yuksekgonul et al., 2023) swaps parsed nouns, adjectives and verbs; without a parser, numbers
(digits and number words) are swapped first, then content words (not in a short list of function
words). Deterministic: the pairs in text order, numbers before words, each distinct result once.
"""

from __future__ import annotations

import re
from typing import List, Tuple

NUMBER_WORDS = frozenset(
    "zero one two three four five six seven eight nine ten eleven twelve twenty hundred thousand".split()
)
FUNCTION_WORDS = frozenset(
    "a an the of to and or in on at by for with from is are was were be it its this that these those".split()
)
_WORD = re.compile(r"^(\W*)(.*?)(\W*)$")  # leading punctuation, the word, trailing punctuation


def _parts(token: str) -> Tuple[str, str, str]:
    match = _WORD.match(token)
    assert match is not None  # the pattern matches any string
    return match.group(1), match.group(2), match.group(3)


def _is_number(word: str) -> bool:
    return word.replace(",", "").replace(".", "").isdigit() or word.lower() in NUMBER_WORDS


def swap_negatives(caption: str, limit: int) -> List[str]:
    """Up to `limit` captions, each `caption` with one pair of its numbers or words swapped (punctuation
    stays in place); [] when no swap changes it (a caption of one content word, say)."""
    tokens = caption.split()
    cores = [_parts(token)[1] for token in tokens]
    numbers = [i for i, word in enumerate(cores) if word and _is_number(word)]
    words = [i for i, word in enumerate(cores) if word and not _is_number(word) and word.lower() not in FUNCTION_WORDS]
    out: List[str] = []
    for group in (numbers, words):
        for n, i in enumerate(group):
            for j in group[n + 1 :]:
                if len(out) == limit:
                    return out
                swapped = list(tokens)
                (pre_i, _, post_i), (pre_j, _, post_j) = _parts(tokens[i]), _parts(tokens[j])
                swapped[i], swapped[j] = pre_i + cores[j] + post_i, pre_j + cores[i] + post_j
                negative = " ".join(swapped)
                if negative != " ".join(tokens) and negative not in out:
                    out.append(negative)
    return out
