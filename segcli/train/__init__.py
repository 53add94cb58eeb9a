"""Training the native model with segment-level recurrence (`segcli train`).

Layout (imports point down: loop -> checkpoint -> config -> tasks -> data):

    config.py       TrainConfig (typed, from YAML: `base:` chains, unknown keys rejected, the old flat format mapped)
    data.py         the corpus: tokenized once (cached), cut into blocks, natural-text windows (TextSource)
    tasks/          data tasks, a registry keyed by name, one module per task (base.py: the interface)
        copy.py     passages copied later in the same row          (a share of the rows)
        repeat.py   a random string repeated to fill the row       (a share of the rows)
        jump.py     two halves with a position skip between them   (a share of the steps)
    loop.py         the loop: a memory setting per step, the tasks' batch, streamed through
                    segcli.engine.loop.stream with one backward per segment; validation
    checkpoint.py   resumable checkpoints and the final model folder (weights, tokenizer, training.json)

The stage configs that trained the bundled model, their logs and probes live apart, in
experiments/bundled-model/.
"""

from .checkpoint import save_checkpoint, save_final
from .config import TrainConfig, from_dict, load_train_config, resolve_config
from .data import TextSource, sample_batch
from .loop import Event, lr_at, make_optimizer, sequence_loss, train
from .tasks import TASKS, Batch, Plan

__all__ = ["TASKS", "Batch", "Event", "Plan", "TextSource", "TrainConfig", "from_dict", "load_train_config",
           "lr_at", "make_optimizer", "resolve_config", "sample_batch", "save_checkpoint", "save_final",
           "sequence_loss", "train"]
