"""Does the memory remember? Synthetic retrieval probes streamed through the memory (`segcli probe`).

`tasks` makes the prompts (passkey, niah, multikey, vt) from a seed, `haystack` holds the text they are hidden
in, `score` streams one prompt through the memory and scores its answer without generating, `grid` runs a grid
of prompts under several settings as records. Nothing here prints.

The package itself holds the torch-free part (the CLI reads the task names for `--help` without importing torch);
`score` and `grid` stream through a model: import them from their modules (`from segcli.probe.score import score`).
"""

from .haystack import FILLER, Haystack
from .tasks import TASK_NAMES, TASKS, Prompt, make_prompt

__all__ = ["FILLER", "Haystack", "TASK_NAMES", "TASKS", "Prompt", "make_prompt"]
