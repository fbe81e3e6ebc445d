"""The bench's deterministic corpus (short and medium English texts) and its latency statistics."""
from __future__ import annotations

import math
import random
from typing import Any, Sequence

SEED = 20240611
CORPUS_SIZE = 4096

# Common English words, each one WordPiece token in BERT-style vocabularies, so a text of n words is
# about n + 3 tokens ([CLS], the final period, [SEP]).
WORDS = """
the of and to in is was for on that with as by at from his her they this which are be had not have
one were their all there been has when who more will would into its time only other new some could
these two may first then any like now over such our man me even most made after also did many before
must through back years where much your way well down should because each just those people how too
little state good very make world still own see men work long get here between both life being under
never day same another know while last might us great old year off come since against go came right
used take three states himself few house use during without again place american around however home
small found thought went say part once general high upon school every does got united left number
course war until always away something fact though water less public put think almost hand enough far
took head yet government system better set told nothing night end why called didn find look asked
later point knew city next program business give group toward young days let room president side
social given present several order national possible rather second face per among form important often
things looked early white case john become large big need four within felt along children saw best
church ever least power development light thought family interest want members mind country area others
done turned although open god service problem kind sense began help means certain whole air today
question across road river music market library garden morning window teacher doctor letter story
""".split()

SHORT_WORDS = (3, 17)     # + [CLS], period, [SEP]: 6-20 tokens
MEDIUM_WORDS = (33, 96)   # 36-99 tokens


# ---------------------------------------------------------------- corpus

def _sentence(rng: random.Random, lo: int, hi: int) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(lo, hi))]
    words[0] = words[0].capitalize()
    return " ".join(words) + "."


def corpus(kind: str, n: int = CORPUS_SIZE, seed: int = SEED) -> list[str]:
    """``n`` deterministic texts: ``kind`` is "short" (6-20 tokens) or "medium" (36-99 tokens)."""
    lo, hi = {"short": SHORT_WORDS, "medium": MEDIUM_WORDS}[kind]
    rng = random.Random(f"{seed}:{kind}")
    return [_sentence(rng, lo, hi) for _ in range(n)]


# ---------------------------------------------------------------- statistics

def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (``q`` in 0..100) of an already sorted sequence."""
    if not sorted_values:
        return float("nan")
    k = (len(sorted_values) - 1) * q / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (k - lo)


def summarize(latencies_s: list[float], errors: int, elapsed_s: float, *, clients: int | str,
              note: str = "", extra: dict[str, Any] | None = None) -> dict[str, Any]:
    lat = sorted(x * 1000.0 for x in latencies_s)
    ok = len(lat)
    out = {"clients": clients, "requests": ok + errors, "ok": ok, "errors": errors,
           "elapsed_s": round(elapsed_s, 4),
           "texts_per_s": round(ok / elapsed_s, 2) if elapsed_s > 0 else None,
           "p50_ms": round(percentile(lat, 50), 3), "p95_ms": round(percentile(lat, 95), 3),
           "p99_ms": round(percentile(lat, 99), 3),
           "mean_ms": round(sum(lat) / ok, 3) if ok else None, "max_ms": round(lat[-1], 3) if lat else None,
           "note": note, "latencies_ms": [round(x, 4) for x in lat]}
    if extra:
        out.update(extra)
    return out
