"""Does the memory remember? Synthetic retrieval probes streamed through the memory (`segcli probe`).

`tasks` makes the prompts (passkey, niah, multikey, vt) from a seed, `haystack` holds the text they are hidden
in, `score` streams one prompt through the memory and scores its answer without generating, `grid` runs a grid
of prompts under several settings as records. Nothing here prints.
"""

from .haystack import FILLER, Haystack
from .score import Score, held, score
from .tasks import TASK_NAMES, TASKS, Prompt, make_prompt

__all__ = ["FILLER", "Haystack", "Score", "held", "score", "TASK_NAMES", "TASKS", "Prompt", "make_prompt"]
