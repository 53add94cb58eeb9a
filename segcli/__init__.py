"""segcli: stream long documents through language models with a bounded, recurrent memory."""

__version__ = "0.1.0"
