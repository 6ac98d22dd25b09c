"""The Shapley core: the game of a unit's channels, its engines, and the estimators of its values.

Reading order: :mod:`.values` (how good a coalition is), :mod:`.weighting` (which
coalitions a value averages over), :mod:`.engines` (forward passes of many coalitions
at once), :mod:`.game` (the game itself), :mod:`.estimators` and :mod:`.surrogate` (the
values of a game, given only its value function), :mod:`.functional`
(:func:`shapley_values`, all of it for one layer). The estimators never see a model.
"""
