"""Structured pruning: which channels form a unit, how they are masked, scored and removed.

Reading order: :mod:`.units` (the channels that go together, found by torch-pruning),
:mod:`.masking` (their masks through ``torch.nn.utils.prune``), :mod:`.recalibration`
(BatchNorm statistics after a removal), :mod:`.scorers` (one number per channel),
:mod:`.rounds` (a step's removals in rounds), :mod:`.schedule` (when and how much).
"""
