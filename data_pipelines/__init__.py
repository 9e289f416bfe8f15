"""Host-side data: TFDS builders, grain pipelines, tokenizer and transforms."""
