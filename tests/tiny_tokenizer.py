"""A small byte-level BPE tokenizer with a chat template, trained in a fraction of a second on
generated text, so that the evaluation tests need neither the embedded model nor ../shared."""

from __future__ import annotations

import functools
import random

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from compresskv.eval.tasks import NOISE_SENTENCES, VOCABULARY

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

PROSE = (
    "It was a bright cold day in April, and the clocks were striking thirteen. The hall smelt of "
    "boiled cabbage and old rag mats! At one end of it a coloured poster, too large for indoor "
    "display, had been tacked to the wall. Was it a dream? Nobody knew. "
)


def corpus(n: int = 120) -> list[str]:
    rng = random.Random(0)
    lines = [" ".join(NOISE_SENTENCES), PROSE]
    for _ in range(n):
        words = rng.sample(VOCABULARY, 12)
        lines.append(" ".join(f"{i}. {w}" for i, w in enumerate(words, rng.randint(1, 900))))
        lines.append(f"One of the special magic numbers for {words[0]}-{words[1]} is: {rng.randint(10**6, 10**7)}.")
        lines.append(f"VAR {''.join(rng.choice('ABCDEFGHIJKLMNOPQRSTUVWXYZ') for _ in range(5))} = {rng.randint(10**4, 10**5)}.")
    return lines


@functools.lru_cache(maxsize=1)
def tiny_tokenizer(vocab_size: int = 400) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token="<|im_start|>"
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def prose(n_sentences: int = 400, seed: int = 0) -> str:
    """Generated English-like text with sentence ends and a few numbers (no ../shared)."""
    rng = random.Random(seed)
    sentences = PROSE.split(". ")
    out = []
    for i in range(n_sentences):
        s = rng.choice(sentences).strip().rstrip(".")
        out.append(f"{s} in the year {rng.randint(1000, 2000)}." if i % 5 == 0 else f"{s}.")
    return " ".join(out)
