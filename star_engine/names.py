"""The names the command line offers, defined once and without PyTorch (so that the command
line answers --help at once); the modules that implement each choice import its names
from here."""

DTYPES = ("float32", "bfloat16", "float16")
# The fused kernels (attention/kernels.py), in the order "auto" tries them.
FUSED_ATTENTION_BACKENDS = ("cudnn", "flash-attn", "flash")
ATTENTION_BACKENDS = ("auto", *FUSED_ATTENTION_BACKENDS, "torch")
STRATEGIES = ("star", "ring", "dense")
ANCHOR_MODES = ("recompute", "broadcast")
DEFAULT_ANCHOR_MODE = "broadcast"  # the same numbers as recompute, about half the phase-1 work
# Where a block's window (--window-tokens/--window-fraction) comes from: "encode", its tokens
# run through the layers again before the block; "pass", the K/V the previous block's owner
# computed for them, passed on once a layer (no per-token work for the window).
WINDOW_MODES = ("encode", "pass")
# A StrategySpec's window where it names no mode: encoded again, as every prefix of a block
# is in the published algorithm.
PUBLISHED_WINDOW_MODE = "encode"
STAR_LAYOUTS = ("uniform", "balanced")
# The algorithm as published: what a StrategySpec means when it names no layout.
PUBLISHED_STAR_LAYOUT = "uniform"
# What the commands run: as fast as ring or faster on two or more GPUs, and as accurate as
# uniform (docs/accuracy.md).
DEFAULT_STAR_LAYOUT = "balanced"
# Whether the commands' star encodes each block knowing the request's question: on, since
# it closed 81% (4 blocks) and 48% (8 blocks) of star's gap to dense on ten tasks at 2K-8K
# for about 1% more phase 1 (docs/accuracy.md); `--anchor-query off` is star as published.
DEFAULT_ANCHOR_QUERY = True
# What else the commands' star puts before each block but the first, in place of the
# published whole first block: the first 1/8 of a block (the attention sink) and the K/V of
# the previous block's last half, as its own encoding computed it, passed on. With the
# question this scored 111% (4 blocks) and 108% (8 blocks) of dense's accuracy on ten tasks
# at 2K-8K, where the question alone scored 99% and 90%, for 0.90-0.97 of its phase 1
# (docs/accuracy.md). `--anchor-fraction 1 --window-fraction 0 --anchor-query off` is star
# as published.
DEFAULT_ANCHOR_FRACTION = 1 / 8
DEFAULT_WINDOW_FRACTION = 1 / 2
DEFAULT_WINDOW_MODE = "pass"
# How many hosts run gives a request: as many as its context needs, since that answered a
# job of mixed lengths at 1.29x the rate of every request on every host, its short requests
# 3x sooner (docs/performance.md). bench and eval run every request on every host unless
# asked, so that their strategy comparisons stay comparisons.
RUN_HOSTS_PER_REQUEST = "auto"
# Where bench, eval and plan --calibrate write what they measure unless --output says: a
# directory of its own in the current one (the repository's .gitignore lists it), not
# files among the user's.
RESULTS_DIRECTORY = "star_engine_results"
