"""Speed benchmark of the tracker (`python -m eval.bench`): one table of every target ratio; its parts (network, renderer, photometric steps, memory, per-configuration stages) as modules."""
