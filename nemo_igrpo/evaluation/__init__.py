"""Evaluation metrics for sampled answers: pass@k, avg@n and a Markdown results table."""

from nemo_igrpo.evaluation.metrics import avg_at_k, markdown_table, pass_at_k, summarize

__all__ = ["avg_at_k", "markdown_table", "pass_at_k", "summarize"]
