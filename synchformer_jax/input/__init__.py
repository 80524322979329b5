"""Input pipeline: transforms (crop, offset, segments), log-mel, normalisation."""
