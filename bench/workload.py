"""Deterministic embedding workloads for the benchmarks in this folder.

Everything here is generated from the fixed word lists below with a seeded ``random.Random``
(whose integer seeding, ``randint`` and ``choice`` are stable across CPython versions), so every
run and every machine embeds exactly the same texts. ``digest()`` fingerprints a workload so that
result files can say which inputs they were measured on.

- ``sentences()``: 2,048 English-like sentences of 10-20 words each (uniform length).
- ``passages()``: 128 passages of exactly 200 words each, made of 10-20-word sentences.

No third-party imports: the locustfile and the benchmark both use this module.
"""

from __future__ import annotations

import hashlib
import random

SEED = 20261122
N_SENTENCES = 2048
SENTENCE_WORDS = (10, 20)
N_PASSAGES = 128
PASSAGE_WORDS = 200

# Common English words by part of speech; all lower case, ASCII, no punctuation. Most are single
# WordPiece tokens in the BERT uncased vocabulary, so token counts stay close to word counts
# (a 200-word passage stays under the 256-token truncation limit).
DETERMINERS = (
    "the a this that every each some another one no their our his her its my your any"
).split()
ADJECTIVES = (
    "small large old new young quiet loud bright dark warm cold early late quick slow heavy "
    "light simple careful busy happy tired strong weak clear strange common rare green blue red "
    "white black long short wide narrow deep fresh dry wet soft hard clean empty full open "
    "local public private modern ancient final main real sharp gentle calm rough smooth rich "
    "poor safe famous hidden useful serious wild free huge tiny"
).split()
NOUNS = (
    "man woman child teacher doctor driver farmer student worker family friend neighbor "
    "city town village river lake forest mountain road street bridge garden house room kitchen "
    "window door table chair book letter paper story song picture camera phone computer "
    "machine engine car train boat plane bicycle horse dog cat bird fish tree flower field "
    "market shop school office hospital library museum station company team group country "
    "government report plan idea question answer problem reason result system program "
    "project meeting morning evening night winter summer season weather rain storm wind "
    "sun moon star sky ocean island coast valley hill stone wall floor roof box bag "
    "bottle cup plate bread water coffee tea dinner lunch breakfast price money market "
    "game match player coach crowd music voice language word message signal network server"
).split()
VERBS = (
    "found saw carried opened closed built moved watched followed visited painted wrote "
    "read sent bought sold cleaned fixed checked tested changed started finished reached "
    "crossed joined helped called met left kept brought held pulled pushed lifted dropped "
    "covered filled washed cooked planted counted measured described explained answered "
    "remembered noticed studied shared played won lost chose ordered"
).split()
ADVERBS = (
    "slowly quickly quietly carefully suddenly finally often always never rarely again "
    "together almost nearly already soon later early easily clearly gently"
).split()
PREPOSITIONS = (
    "in on under over near behind beside across through along around after before during "
    "without with into from toward past between against"
).split()
CONJUNCTIONS = "and but while because although when after before since".split()


def _noun_phrase(rng: random.Random) -> list[str]:
    words = [rng.choice(DETERMINERS)]
    if rng.random() < 0.6:
        words.append(rng.choice(ADJECTIVES))
    words.append(rng.choice(NOUNS))
    return words


def _clause(rng: random.Random) -> list[str]:
    words = _noun_phrase(rng)
    if rng.random() < 0.25:
        words.append(rng.choice(ADVERBS))
    words.append(rng.choice(VERBS))
    words += _noun_phrase(rng)
    while rng.random() < 0.55:
        words.append(rng.choice(PREPOSITIONS))
        words += _noun_phrase(rng)
    return words


def _sentence(rng: random.Random, n_words: int) -> str:
    words = _clause(rng)
    while len(words) < n_words:
        words.append(rng.choice(CONJUNCTIONS))
        words += _clause(rng)
    words = words[:n_words]
    # No sentence ends on a function word: swap it for a noun (an adverb after a noun).
    if words[-1] in DETERMINERS or words[-1] in PREPOSITIONS or words[-1] in CONJUNCTIONS:
        words[-1] = rng.choice(ADVERBS if words[-2] in NOUNS else NOUNS)
    text = " ".join(words)
    return text[0].upper() + text[1:] + "."


def sentences(n: int = N_SENTENCES, seed: int = SEED) -> list[str]:
    """``n`` sentences of 10-20 words each (length uniform over that range)."""
    rng = random.Random(seed)
    lo, hi = SENTENCE_WORDS
    return [_sentence(rng, rng.randint(lo, hi)) for _ in range(n)]


def passages(n: int = N_PASSAGES, words: int = PASSAGE_WORDS, seed: int = SEED + 1) -> list[str]:
    """``n`` passages of exactly ``words`` words, each a run of 10-20-word sentences."""
    rng = random.Random(seed)
    lo, hi = SENTENCE_WORDS
    out = []
    for _ in range(n):
        parts = []
        remaining = words
        while remaining > hi:
            k = rng.randint(lo, min(hi, remaining - lo))
            parts.append(_sentence(rng, k))
            remaining -= k
        parts.append(_sentence(rng, remaining))
        out.append(" ".join(parts))
    return out


def batches(texts: list[str], size: int) -> list[list[str]]:
    """Consecutive batches of ``size`` (the last one may be shorter)."""
    return [texts[i : i + size] for i in range(0, len(texts), size)]


def digest(texts: list[str]) -> str:
    """sha256 over the texts (NUL-separated), to fingerprint a workload in result files."""
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()


if __name__ == "__main__":
    s, p = sentences(), passages()
    print(f"{len(s)} sentences, words {min(len(x.split()) for x in s)}-"
          f"{max(len(x.split()) for x in s)}, sha256 {digest(s)[:16]}")
    print(f"{len(p)} passages, words {min(len(x.split()) for x in p)}-"
          f"{max(len(x.split()) for x in p)}, sha256 {digest(p)[:16]}")
    for x in s[:5]:
        print(" ", x)
    print(" ", p[0][:300], "...")
