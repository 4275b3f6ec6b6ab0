"""Text in, token batches out: tokenizers, chat templates, file readers, packing into rows, and the built-in
arithmetic task (``tasks/``)."""
