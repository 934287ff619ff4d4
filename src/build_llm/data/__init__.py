"""Text -> tokens: tokenizers, corpora (files -> tokens -> splits -> windows), the ABC Markov source,
instruction and classification records."""
