"""The engine: documents through a backend's memory, as records.

`loop` is the one segment loop; `stream.Stream` scores a document through it (one `SegmentResult` per
segment) and `stream.Totals` folds results into a summary; `run.CorpusRun` runs a corpus (one process or
sharded under torchrun) as an iterator of records; `compare` runs one document under several settings;
`generate` continues a document. Nothing here prints: the CLI writes what the engine yields.
"""

from .loop import split, stream, sync
from .run import TIMING_FIELDS, CorpusRun, RunOptions
from .stream import WINDOW_CHUNK, SegmentResult, Stream, Totals, pass_size, resource_report, span_note

__all__ = ["split", "stream", "sync", "TIMING_FIELDS", "CorpusRun", "RunOptions", "WINDOW_CHUNK", "SegmentResult", "Stream", "Totals", "pass_size",
           "resource_report", "span_note"]
