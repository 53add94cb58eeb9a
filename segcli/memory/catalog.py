"""What each memory policy is, without torch: its name, update rule, size and the config fields it uses.

The CLI reads this to list, offer and check policies (`segcli --help`, `segcli policies`, option validation) without
importing torch; the classes in `registry` hold the same strings as attributes, and tests/memory/test_catalog.py
checks that they agree, so the two cannot drift.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PolicyInfo:
    name: str  # the public name (--memory)
    rule: str  # the update rule, one line
    size_rule: str  # how many slots it holds
    parameters: tuple[str, ...] = ()  # config fields this policy uses


CATALOG: dict[str, PolicyInfo] = {p.name: p for p in (  # the registry's order: `segcli policies` lists them so
    PolicyInfo("full", "append: Mem = all past pairs (grows without bound)", "grows with the document"),
    PolicyInfo("none", "Mem = empty: every segment is read alone", "0"),
    PolicyInfo("fifo", "append, then drop the oldest beyond memory_size pairs", "memory_size",
               ("memory_size", "layer_budget")),
    PolicyInfo("xl", "Mem = the previous segment's pairs (equals fifo with memory_size = segment_size)",
               "segment_size"),
    PolicyInfo("sink", "keep the first sink_tokens pairs for ever + FIFO of memory_size pairs",
               "sink_tokens + memory_size", ("memory_size", "sink_tokens", "layer_budget")),
    PolicyInfo("average", "one slot: the cumulative average of all past pairs", "1 slot"),
    PolicyInfo("compressive", "FIFO of memory_size; dropped pairs mean-pooled compress_rate:1 into a FIFO of "
               "compressed_size", "memory_size + compressed_size",
               ("memory_size", "compress_rate", "compressed_size", "layer_budget")),
    PolicyInfo("linear", "fast-weight matrix mu += phi(K)^T V, nu += sum phi(k); read phi(q)mu/phi(q)nu, gated with "
               "the segment", "d_k x d_v (+ d_k) per head"),
    PolicyInfo("tova", "keep the memory_size pairs of [memory; segment] with the most attention from the segment's "
               "last query (head mean)", "memory_size", ("memory_size", "layer_budget")),
    PolicyInfo("h2o", "per head keep the recent_tokens newest pairs + the memory_size - recent_tokens with the most "
               "accumulated attention", "memory_size", ("memory_size", "recent_tokens", "layer_budget")),
    PolicyInfo("snapkv", "per head keep the window newest pairs + those the last window queries attend to most "
               "(max-pooled, kernel 5)", "memory_size", ("memory_size", "window", "layer_budget")),
    PolicyInfo("keynorm", "per head keep the memory_size pairs with the smallest key L2 norm", "memory_size",
               ("memory_size", "layer_budget")),
)}
POLICY_NAMES: tuple[str, ...] = tuple(CATALOG)

POLICY_ON_ATTENTION = ("full", "none")  # policies a hybrid's attention layers follow with the model's own cache
