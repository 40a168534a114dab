"""What a command asks of the runtime, made from its flags once, by its check: the model and
how the job runs it, and what an engine's KV cache is sized for. The session and the engine
take these; neither sees the command line. Without PyTorch, so that the checks before the
work stay quick."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RuntimeSettings:
    """The model and how this job runs it."""

    model: str  # as --model names it: a built-in model, a preset, a checkpoint directory or a .gguf file
    dtype: str | None = None  # None: bfloat16 on GPUs, float32 on CPUs
    device: str | None = None  # "cuda" or "cpu"; None: cuda where rank 0 sees a GPU
    tp: int = 1  # ranks of a host, which hold one copy of the model together
    attn_backend: str = "auto"  # the kernels of prefill and the query pass
    cuda_graph: bool = True  # each decode step replayed from a CUDA graph, on GPUs


@dataclass(frozen=True)
class KVCacheSettings:
    """What an engine's KV cache holds: `batch` requests at once of up to max_tokens tokens
    each (context, query and generated), at most max_tail of them after the context, and
    `contexts` contexts at once: requests beyond them decode reading a context that another
    request of the batch holds (slots.py)."""

    max_tokens: int | None = None  # None: the model's context length
    batch: int = 1
    max_tail: int | None = None  # None: up to max_tokens
    contexts: int | None = None  # None: one per request of the batch
    # False: a request whose context another arena holds copies it into its own (a whole
    # arena) instead of reading it there; to measure what sharing gains.
    share_contexts: bool = True
    # Else a max_tokens beyond the positions the model was trained for is refused.
    beyond_trained_positions: bool = False

    def tokens(self, trained: int) -> int:
        """The longest request: max_tokens, else the `trained` positions of the model."""
        return self.max_tokens or trained

    def tail(self, tokens: int) -> int:
        """The most tokens after the context of a request of up to `tokens` tokens."""
        return tokens if self.max_tail is None else min(self.max_tail, tokens)

    @property
    def whole_requests(self) -> int:
        """How many of the batch's arenas hold a whole request (a context and its tail)."""
        return self.batch if self.contexts is None else max(1, min(self.contexts, self.batch))


@dataclass(frozen=True)
class ScaleOutSettings:
    """How many hosts each request runs on: "all" (every request on every host), "auto"
    (as many as its context needs, groups.py) or a number of hosts."""

    hosts_per_request: str = "all"
    max_block: int | None = None  # with auto: tokens of a block at most; None: the model's default
    ttft_target_s: float | None = None  # with auto: the fewest hosts predicted to meet it, instead

    @property
    def fixed(self) -> int | None:
        """The number of hosts every request runs on, where the flag gives one."""
        return int(self.hosts_per_request) if self.hosts_per_request.isdigit() else None
