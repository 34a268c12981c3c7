"""Long-context tasks generated locally at a target token length, in the spirit of RULER.

RULER (Hsieh et al., arXiv 2404.06654) builds synthetic prompts of a chosen length whose answer is
known, so a model's (or a cache's) long-context ability is measured without any download. This
module generates the retrieval, multi-hop tracing and aggregation tasks of its core set, in our
own words and code:

=================  =====================================================================
``niah_single``    one needle "One of the special magic numbers for <key> is: <value>." hidden
                   in a haystack; asked for the value of <key>
``niah_multikey``  four needles with different keys; asked for one of them (three distractors)
``niah_multivalue`` four needles with the same key; asked for all four values
``niah_multiquery`` four needles with different keys; asked for all four values
``vt``             variable tracking: a chain ``VAR A = 12345``, ``VAR B = VAR A``, ... hidden
                   in the haystack; asked for every variable that holds the value
``cwe``            common-words extraction: a numbered list of words where ten words appear
                   many times and the others a few times; asked for the ten most common
=================  =====================================================================

Every prompt goes through the model's chat template (when it has one), ends with an answer
prefix in the assistant's turn (as RULER does), and is fitted to the target length (chat
template included) within 2% by a search over the amount of filler. The haystack is RULER's
"noise" filler (repeated plain sentences) by default, or any text the user gives (cut at a
seeded position). Every needle sentence appears exactly once; every task is reproducible from
its seed. Scoring follows RULER's ``string_match_all``: the fraction of expected strings found in
the answer, here as whole words, case-insensitively.
"""

from __future__ import annotations

import random
import re
import string
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

NOISE_SENTENCES = (
    "The grass is green.",
    "The sky is blue.",
    "The sun is yellow.",
    "Here we go.",
    "There and back again.",
)

ADJECTIVES = """
able ancient angry bitter black blue bold brave bright broad brown calm careful cheap
clean clever cold cool crazy curious damp dark deep dry dusty eager early easy empty
fair famous fancy fast fierce flat fresh friendly funny gentle giant glad golden good
grand gray great green happy hard heavy hidden high hollow honest hot huge humble hungry
icy jolly kind large late lazy light little lively lonely long loud lucky mad magic
mighty modern narrow neat nervous new nice noble odd old orange pale perfect pink plain
polite poor proud purple quick quiet rapid rare red rich rough round royal rusty sad
safe salty sharp shiny short shy silent silly simple slow small smart smooth soft solid
sour spicy steep sticky strange strict strong sunny sweet swift tall tame tender thick
thin tidy tiny tough tricky ugly vast violet warm wet white wide wild wise wooden yellow
young
""".split()

NOUNS = """
acorn actor airport album anchor angle animal answer apple apron arch arm army arrow
artist autumn avenue baby badge bag bakery ball balloon banana band bank barn basket bath
beach beard bed bee bell belt bench berry bicycle bird blanket boat body bone book boot
bottle bowl box branch bread brick bridge brother brush bucket bulb bus butter button
cabin cable cake camel camera camp candle canoe canyon cap captain car card carpet carrot
castle cat cave ceiling cell chain chair chalk cheese cherry chest chicken child chimney
church circle city clock cloud coach coat coin collar comet cook copper corn cottage
cotton country cousin cow crab crayon cream creek crow crown cup curtain cushion daisy
dancer deer desert desk diamond dinner doctor dog doll dolphin door dragon drawer dream
dress drum duck eagle ear earth egg elbow elephant engine eye fabric face factory falcon
farm feather fence field finger fire fish flag flame flower flute fog foot forest fork
fountain fox frog fruit garden gate ghost gift giraffe glass glove goat gold garlic grape
grass guitar hammer hand harbor hat hawk heart helmet hill honey horn horse hospital
hotel house island jacket jar jelly jewel journey judge jungle kettle key kitchen kite
knee knife ladder lake lamp lantern leaf lemon letter library lighthouse lion lizard lock
machine magnet mango map marble market meadow melon mirror monkey moon mountain mouse
mouth museum mushroom needle nest net night notebook ocean octopus office olive onion
orchard owl paint palace pan panda paper parrot path peach pear pearl pebble pen pencil
pepper piano picture pillow pilot pine planet plate pocket poet pond potato puzzle pyramid
queen rabbit radio rain ribbon river road robot rock roof room rope rose sail salad sand
saucer scarf school scissors sea seed shadow sheep shell ship shirt shoe shovel silver
singer sister sky sled snail snake snow soap sock sofa soldier song spider spoon spring
squirrel stable stage star station statue stone storm stove street string sugar summer
swan sword table tail teacher teapot tent thread throne thunder ticket tiger timber toast
tomato tongue tooth tower town toy tractor train tree truck trumpet tulip tunnel turtle
umbrella valley vase village violin volcano wagon wall walnut watch water wave whale wheel
whistle window wing winter wizard wolf wool worm yard zebra
""".split()

VOCABULARY = tuple(dict.fromkeys(NOUNS + ADJECTIVES))


@dataclass
class Task:
    """One generated question.

    Attributes:
        name: the task's name (``"niah_single"``, ``"vt"``, ...).
        input_ids: ``[1, T]`` prompt token ids, chat template and answer prefix included.
        answers: the strings a correct answer contains (all of them, RULER's ``string_match_all``).
        needles: the sentences hidden in the context; each appears exactly once in the prompt.
        seed: the seed the task was generated from.
        max_new_tokens: how many tokens to generate for the answer.
        target_length: the length asked for (the prompt is within 2% of it).
        info: task-specific details (keys asked, depths, word frequencies, ...).
        context_length: how many of :attr:`input_ids` come before the question (the rest: the
            question, the end of the turn and the answer prefix), for asking it after the context
            was compressed (``compresskv bench --question-after``); ``None`` when the tokenizer
            gives no offsets to find it.
    """

    name: str
    input_ids: torch.Tensor
    answers: list[str]
    needles: list[str]
    seed: int
    max_new_tokens: int
    target_length: int
    info: dict[str, Any] = field(default_factory=dict)
    context_length: int | None = None

    @property
    def length(self) -> int:
        """The prompt's length in tokens."""
        return int(self.input_ids.shape[-1])

    def score(self, text: str) -> float:
        """Fraction of :attr:`answers` found in ``text`` as whole words (case-insensitive)."""
        return score_all(text, self.answers)


def _found(text: str, answer: str) -> bool:
    pattern = r"(?<![0-9A-Za-z])" + re.escape(answer) + r"(?![0-9A-Za-z])"
    return re.search(pattern, text, flags=re.IGNORECASE) is not None


def score_all(text: str, answers: list[str]) -> float:
    """RULER's ``string_match_all`` on whole words: the fraction of ``answers`` in ``text``."""
    if not answers:
        raise ValueError("score_all needs at least one expected answer")
    return sum(_found(text, a) for a in answers) / len(answers)


# -- prompts ---------------------------------------------------------------------------------
def _prompt_text(tokenizer: Any, user: str, answer_prefix: str) -> tuple[str, bool]:
    """The prompt's text and whether the tokenizer adds its special tokens to it."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": user}], add_generation_prompt=True, tokenize=False
        )
        return text + answer_prefix, False
    return (f"{user}\n\n{answer_prefix}" if answer_prefix else user), True


def prompt_ids(tokenizer: Any, user: str, answer_prefix: str = "") -> list[int]:
    """Token ids of ``user`` as one chat turn (the model's chat template when it has one),
    followed by ``answer_prefix`` at the start of the assistant's reply."""
    text, special = _prompt_text(tokenizer, user, answer_prefix)
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def question_start(tokenizer: Any, user: str, answer_prefix: str, question: str) -> int | None:
    """How many of :func:`prompt_ids`'s tokens come before ``question`` (its last occurrence in
    ``user``): the first token that reaches into it starts the question part. ``None`` when the
    tokenizer gives no character offsets (a slow tokenizer)."""
    text, special = _prompt_text(tokenizer, user, answer_prefix)
    at = text.rindex(question)
    try:
        offsets = tokenizer(text, add_special_tokens=special, return_offsets_mapping=True)["offset_mapping"]
    except (NotImplementedError, KeyError, TypeError):
        return None
    return next((i for i, (begin, end) in enumerate(offsets) if end > at and end > begin), None)


class Haystack:
    """Filler for the context, in small units so that a prompt can be fitted to a token length.

    ``None`` gives RULER's noise sentences (one sentence per unit); a text gives its words (one
    word per unit), read from a seeded position, with needles placed at sentence ends.
    """

    def __init__(self, text: str | None = None, seed: int = 0) -> None:
        self.is_noise = text is None
        if text is None:
            self.words: list[str] = []
        else:
            words = text.split()
            if len(words) < 64:
                raise ValueError("compresskv: the haystack text is too short (fewer than 64 words)")
            start = random.Random(seed).randrange(max(1, len(words) // 2))
            self.words = words[start:] + words[:start]

    def units(self, n: int) -> list[str]:
        """The first ``n`` units."""
        if self.is_noise:
            return [NOISE_SENTENCES[i % len(NOISE_SENTENCES)] for i in range(n)]
        if n > len(self.words):
            raise ValueError(
                f"compresskv: the haystack text has {len(self.words)} words, too few for this length"
            )
        return self.words[:n]

    def weave(self, n: int, inserts: list[tuple[float, str]]) -> str:
        """``n`` units with each ``(depth, sentence)`` inserted at ``depth`` (0 = start, 1 = end)."""
        units = self.units(n)
        cuts: list[tuple[int, str]] = []
        for depth, sentence in inserts:
            cut = int(round(depth * n))
            if not self.is_noise:
                cut = _sentence_end(units, cut)
            cuts.append((cut, sentence))
        out: list[str] = []
        prev = 0
        for cut, sentence in sorted(cuts, key=lambda c: c[0]):
            out.extend(units[prev:cut])
            out.append(sentence)
            prev = cut
        out.extend(units[prev:])
        return " ".join(out)

    @property
    def max_units(self) -> int | None:
        """How many units there are (``None``: unlimited noise)."""
        return None if self.is_noise else len(self.words)

    def contains(self, needle: str) -> bool:
        """Whether the filler itself contains ``needle`` (then a needle would not be unique)."""
        return (not self.is_noise) and needle in " ".join(self.words)


def _sentence_end(words: list[str], cut: int, reach: int = 40) -> int:
    """The nearest index ``i`` near ``cut`` where ``words[i-1]`` ends a sentence."""
    for delta in range(reach + 1):
        for i in (cut - delta, cut + delta):
            if 0 < i <= len(words) and re.search(r"[.!?][\"')\]]*$", words[i - 1]):
                return i
    return cut



def fit_length(
    tokenizer: Any, build: Callable[[int], tuple[str, str]], length: int, tolerance: float = 0.02,
    max_units: int | None = None,
) -> tuple[list[int], int]:
    """Find the amount of filler ``n`` (at most ``max_units``) whose prompt
    (``build(n) -> (user, answer_prefix)``) is the longest not exceeding ``length`` tokens, or,
    when that one is more than ``tolerance`` short (coarse filler), the closest neighbour;
    returns ``(ids, n)``. Raises when no prompt lands within ``tolerance`` of ``length``."""

    def ids_of(n: int) -> list[int]:
        user, prefix = build(n)
        return prompt_ids(tokenizer, user, prefix)

    base = len(ids_of(0))
    if base > length:
        raise ValueError(
            f"compresskv: the task's prompt needs {base} tokens without any filler; ask for a length above that"
        )
    cap = max_units if max_units is not None else 1 << 30
    lo, hi = 0, min(max(8, length), cap)
    while len(ids_of(hi)) <= length:  # make sure hi overshoots
        if hi >= cap:
            lo = hi = cap
            break
        lo, hi = hi, min(hi * 2, cap)
    while hi - lo > 1:  # largest n with len <= length (length grows with n, up to tokenizer merges)
        mid = (lo + hi) // 2
        if len(ids_of(mid)) <= length:
            lo = mid
        else:
            hi = mid
    best = ids_of(lo)
    if abs(len(best) - length) > tolerance * length:
        for n in (lo + 1, lo - 1, lo + 2):  # rare: a non-monotone step; try the neighbours
            if 0 <= n <= cap:
                cand = ids_of(n)
                if abs(len(cand) - length) < abs(len(best) - length):
                    best, lo = cand, n
        if abs(len(best) - length) > tolerance * length:
            raise ValueError(
                f"compresskv: could not fit the prompt to {length} tokens within {tolerance:.0%} "
                f"(closest: {len(best)}); the filler is too short or too coarse for this length"
            )
    return best, lo


# -- the tasks -------------------------------------------------------------------------------
def _key(rng: random.Random, taken: set[str]) -> str:
    while True:
        key = f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"
        if key not in taken:
            taken.add(key)
            return key


def _number(rng: random.Random, taken: set[str], digits: int = 7) -> str:
    while True:
        value = str(rng.randint(10 ** (digits - 1), 10**digits - 1))
        if value not in taken:
            taken.add(value)
            return value


def _needle(key: str, value: str) -> str:
    return f"One of the special magic numbers for {key} is: {value}."


def _join_keys(keys: list[str]) -> str:
    return keys[0] if len(keys) == 1 else ", ".join(keys[:-1]) + f" and {keys[-1]}"


NIAH_INTRO = (
    "Some special magic numbers are hidden within the following text. Make sure to memorize them. "
    "I will quiz you about the numbers afterwards."
)


def _niah(tokenizer: Any, length: int, seed: int, haystack: Haystack, n_keys: int, n_values: int, n_asked: int, name: str, max_new: int) -> Task:
    for attempt in range(100):
        rng = random.Random(f"{name}:{seed}:{attempt}")
        taken: set[str] = set()
        keys = [_key(rng, taken) for _ in range(n_keys)]
        pairs = [(k, _number(rng, taken)) for k in keys for _ in range(n_values if k == keys[0] else 1)]
        # a value the haystack text happens to contain would not be unique: draw again
        if not any(haystack.contains(v) for _, v in pairs):
            break
    needles = [_needle(k, v) for k, v in pairs]
    order = list(range(len(needles)))
    rng.shuffle(order)
    depths = sorted(rng.uniform(0.05, 0.95) for _ in needles)
    inserts = [(depths[i], needles[j]) for i, j in enumerate(order)]
    asked = keys[:n_asked]
    answers = [v for k, v in pairs if k in asked]
    if n_values > 1:
        question = f"What are all the special magic numbers for {asked[0]} mentioned in the provided text?"
        prefix = f"The special magic numbers for {asked[0]} mentioned in the provided text are"
    elif n_asked > 1:
        question = f"What are all the special magic numbers for {_join_keys(asked)} mentioned in the provided text?"
        prefix = f"The special magic numbers for {_join_keys(asked)} mentioned in the provided text are"
    else:
        question = f"What is the special magic number for {asked[0]} mentioned in the provided text?"
        prefix = f"The special magic number for {asked[0]} mentioned in the provided text is"

    def build(n: int) -> tuple[str, str]:
        return f"{NIAH_INTRO}\n{haystack.weave(n, inserts)}\n{question}", prefix

    ids, n = fit_length(tokenizer, build, length, max_units=haystack.max_units)
    info = {"keys": keys, "asked": asked, "depths": [d for d, _ in inserts]}
    return Task(name, torch.tensor([ids]), answers, needles, seed, max_new, length, info,
                question_start(tokenizer, *build(n), question))


def niah_single(tokenizer: Any, length: int, seed: int = 0, haystack: str | None = None) -> Task:
    """One needle; the question asks for its value."""
    return _niah(tokenizer, length, seed, Haystack(haystack, seed), 1, 1, 1, "niah_single", 16)


def niah_multikey(tokenizer: Any, length: int, seed: int = 0, haystack: str | None = None) -> Task:
    """Four needles with different keys; the question asks for one (three distractors)."""
    return _niah(tokenizer, length, seed, Haystack(haystack, seed), 4, 1, 1, "niah_multikey", 16)


def niah_multivalue(tokenizer: Any, length: int, seed: int = 0, haystack: str | None = None) -> Task:
    """Four needles with the same key and different values; the question asks for all four."""
    return _niah(tokenizer, length, seed, Haystack(haystack, seed), 1, 4, 1, "niah_multivalue", 48)


def niah_multiquery(tokenizer: Any, length: int, seed: int = 0, haystack: str | None = None) -> Task:
    """Four needles with different keys; the question asks for all four values."""
    return _niah(tokenizer, length, seed, Haystack(haystack, seed), 4, 1, 4, "niah_multiquery", 48)


def _variable(rng: random.Random, taken: set[str]) -> str:
    while True:
        name = "".join(rng.choice(string.ascii_uppercase) for _ in range(5))
        if name not in taken:
            taken.add(name)
            return name


def vt(tokenizer: Any, length: int, seed: int = 0, haystack: str | None = None, hops: int = 4) -> Task:
    """Variable tracking: ``VAR X1 = v``, then ``VAR X2 = VAR X1`` ... (``hops`` copies) hidden
    in order in the haystack; the question asks for every variable holding ``v``."""
    rng = random.Random(f"vt:{seed}")
    hay = Haystack(haystack, seed)
    taken: set[str] = set()
    names = [_variable(rng, taken) for _ in range(hops + 1)]
    while any(hay.contains(n) for n in names):
        taken = set()
        names = [_variable(rng, taken) for _ in range(hops + 1)]
    value = _number(rng, set(), digits=5)
    needles = [f"VAR {names[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:])]
    depths = sorted(rng.uniform(0.05, 0.95) for _ in needles)
    inserts = list(zip(depths, needles))
    intro = "Memorize and track the chain of variable assignments hidden in the following text."
    question = f"Question: Find all variables that are assigned the value {value} in the text above."
    prefix = (
        f"Answer: According to the chain of variable assignments in the text above, {len(names)} "
        f"variables are assigned the value {value}, they are:"
    )

    def build(n: int) -> tuple[str, str]:
        return f"{intro}\n\n{hay.weave(n, inserts)}\n\n{question}", prefix

    ids, n = fit_length(tokenizer, build, length, max_units=hay.max_units)
    info = {"value": value, "depths": depths}
    return Task("vt", torch.tensor([ids]), names, needles, seed, 32, length, info,
                question_start(tokenizer, *build(n), question))


def cwe(
    tokenizer: Any, length: int, seed: int = 0, haystack: str | None = None, common: int = 10,
    freq_common: int = 30, freq_rare: int = 3,
) -> Task:
    """Common-words extraction: a numbered list in which ``common`` words appear ``freq_common``
    times and the others ``freq_rare`` times; the question asks for the ``common`` most frequent.
    ``haystack`` is ignored (the list is the context). For short prompts ``freq_common`` shrinks
    so that the common words fill at most half of the list."""
    rng = random.Random(f"cwe:{seed}")
    words = list(VOCABULARY)
    rng.shuffle(words)
    top, rest = words[:common], words[common:]
    intro = (
        "Below is a numbered list of words. In these words, some appear more often than others. "
        "Memorize the ones that appear most often."
    )
    question = f"Question: What are the {common} most common words in the above list?"
    prefix = f"Answer: The top {common} words that appear most often in the list are:"
    # How many list items fit: measured on a sample list, only used to choose the frequencies.
    overhead = len(prompt_ids(tokenizer, f"{intro}\n\n{question}", prefix))
    sample_n = max(50, (length - overhead) // 5)
    sample = " ".join(f"{i + 1}. {w}" for i, w in enumerate((words * (sample_n // len(words) + 1))[:sample_n]))
    per_item = len(tokenizer(" " + sample, add_special_tokens=False)["input_ids"]) / sample_n
    items_fit = max(1, int((length - overhead) / per_item))
    freq_common = max(freq_rare + 2, min(freq_common, items_fit // (2 * common)))
    rare_fit = max(0, items_fit - common * freq_common) // freq_rare
    if rare_fit > len(rest):  # long prompts: repeat rare words more often, keep the gap
        freq_rare = -(-(items_fit - common * freq_common) // len(rest))
        freq_common = max(freq_common, 3 * freq_rare)

    def listing(n: int) -> list[str]:
        items = top * freq_common + rest[:n] * freq_rare
        random.Random(f"cwe-order:{seed}:{n}").shuffle(items)
        return items

    def build(n: int) -> tuple[str, str]:
        items = listing(n)
        text = " ".join(f"{i + 1}. {w}" for i, w in enumerate(items))
        return f"{intro}\n{text}\n{question}", prefix

    ids, n = fit_length(tokenizer, build, length, max_units=len(rest))
    info = {"freq_common": freq_common, "freq_rare": freq_rare, "rare_words": min(n, len(rest))}
    return Task("cwe", torch.tensor([ids]), top, [], seed, 64, length, info, question_start(tokenizer, *build(n), question))


TASKS: dict[str, Callable[..., Task]] = {
    "niah_single": niah_single,
    "niah_multikey": niah_multikey,
    "niah_multivalue": niah_multivalue,
    "niah_multiquery": niah_multiquery,
    "vt": vt,
    "cwe": cwe,
}


def available_tasks() -> list[str]:
    """Names :func:`make_task` accepts (the perplexity task is separate: :func:`make_perplexity_task`)."""
    return list(TASKS)


def make_task(name: str, tokenizer: Any, length: int = 4096, seed: int = 0, haystack: str | None = None) -> Task:
    """Generate task ``name`` at ``length`` tokens (within 2%, chat template included) from ``seed``;
    ``haystack`` is a text to hide the needles in (default: RULER's noise sentences)."""
    if name not in TASKS:
        raise ValueError(f"compresskv: unknown task {name!r}; choose one of {available_tasks()}")
    return TASKS[name](tokenizer, length, seed=seed, haystack=haystack)
