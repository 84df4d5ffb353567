"""Datasets, the embedded arithmetic task, the character tokenizer and prompt construction for both stages."""
