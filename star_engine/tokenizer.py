"""Text to tokens: the model's tokenizer, and its chat template cut into context and query.

A request is a long context and a short query. The prompt is the chat template applied
to one user turn `context + "\\n\\n" + query`; the engine cuts it right after the context,
so that phase 1 encodes template prefix + context and phase 2 starts with the query and
the template's tail (end of turn, assistant header).
"""

from __future__ import annotations

from .gguf_file import cache_dir
from .model_source import ModelSource, resolve


class Tokenizer:
    """A transformers tokenizer with the context/query cut of its chat template."""

    def __init__(self, hf_tokenizer, eos_token_ids: tuple[int, ...]) -> None:
        self.hf = hf_tokenizer
        self.eos_token_ids = eos_token_ids

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(ids, skip_special_tokens=True)

    def prompt(self, context: str, query: str) -> tuple[list[int], list[int]]:
        """Token ids of (context part, query part) of the prompt."""
        head, tail = self._frame_text(query)
        return self._head_ids(head + context), self.encode(tail)

    def frame(self, query: str) -> tuple[list[int], list[int]]:
        """Token ids before a context (the template's head) and after it (the query and the
        template's tail), for contexts assembled from token ids."""
        head, tail = self._frame_text(query)
        return self._head_ids(head), self.encode(tail)

    def question_tokens(self, query: str) -> int:
        """How many of the first ids of the part after the context are the question itself
        (before the template's tail): all of them where the question's own ids are not
        exactly where that part begins."""
        tail = self.encode(self._frame_text(query)[1])
        own = self.encode(f"\n\n{query}")
        return len(own) if tail[:len(own)] == own else len(tail)

    def _frame_text(self, query: str) -> tuple[str, str]:
        if not self.hf.chat_template:
            return "", f"\n\n{query}"
        marker = "@@STAR_ENGINE_CONTEXT@@"
        messages = [{"role": "user", "content": f"{marker}\n\n{query}"}]
        text = self.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        cut = text.index(marker)
        return text[:cut], text[cut + len(marker):]

    def _head_ids(self, text: str) -> list[int]:
        # Without a chat template, the beginning-of-sequence token starts the prompt.
        bos = [] if self.hf.chat_template or self.hf.bos_token_id is None else [self.hf.bos_token_id]
        return bos + self.encode(text)


class ByteTokenizer:
    """UTF-8 bytes as tokens, for shape presets, which have random weights and no vocabulary."""

    eos_token_ids: tuple[int, ...] = ()

    def __init__(self, vocab_size: int) -> None:
        if vocab_size < 256:
            raise ValueError("a byte tokenizer needs a vocabulary of at least 256")
        self.vocab_size = vocab_size

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def prompt(self, context: str, query: str) -> tuple[list[int], list[int]]:
        return self.encode(context), self.encode(f"\n\n{query}")

    def frame(self, query: str) -> tuple[list[int], list[int]]:
        return [], self.encode(f"\n\n{query}")

    def question_tokens(self, query: str) -> int:
        return len(self.encode(f"\n\n{query}"))


def load_tokenizer(spec: str, eos_token_ids: tuple[int, ...]) -> Tokenizer | ByteTokenizer:
    """The tokenizer of the model `spec` names (see checkpoint.resolve)."""
    source = resolve(spec)
    if source.kind == "preset":
        from .config import PRESETS

        return ByteTokenizer(PRESETS[spec].vocab_size)
    from transformers import AutoTokenizer

    if source.kind == "hf":
        return Tokenizer(AutoTokenizer.from_pretrained(str(source.path)), eos_token_ids)
    return Tokenizer(_gguf_tokenizer(source), eos_token_ids)


def _gguf_tokenizer(source: ModelSource):
    """Building a tokenizer from GGUF metadata takes seconds; it is cached after the first time."""
    from transformers import AutoTokenizer

    cache = cache_dir(source.path, "tokenizers")
    if (cache / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(str(cache))
    tokenizer = AutoTokenizer.from_pretrained(str(source.path.parent), gguf_file=source.path.name)
    try:
        tokenizer.save_pretrained(str(cache))
    except OSError:
        pass  # a read-only home only costs the seconds again next time
    return tokenizer
