"""Floor 5, prune: from a model's tensors to masks.

What lives here: the plan of prunable tensors and their owners (`plan`), calibration statistics
(`calibrate`), criteria and lazy scores (`criteria`, `scoring`), selection (`selection`, the
rules in `rules` and `patterns`, the exact radix select in `radix` and `streaming`, layer
protection in `protect`), channel groups and structured rules (`channel_graph`, `channels`),
masks enforced during training (`masks`), schedules (`schedule`, `gradual`), one mask update
(`step`: calibrate -> score -> select), and the block-sequential engine for large transformers
(`sequential/`: statistics per window, methods, decisions shared between ranks, one block at a time). It may import `models` and the floors below, never training
or the pipelines.
"""
