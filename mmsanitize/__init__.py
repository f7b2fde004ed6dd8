"""mmsanitize: poison, scan, sanitize and evaluate image-text datasets stored as WebDataset shards."""

__version__ = "0.1.0"
