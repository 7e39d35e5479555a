"""Causal tracing for vision-language models: where a fact about an image comes back when restored.

`tracing.tracer` traces one probe (corrupt the image or the question, restore one hidden state
group at a time); `tracing.heatmap` draws the traces; `python -m tracing.causal_trace` traces a
world backbone's facts per relation and writes the heatmaps, a JSON of the numbers and a table.
"""
