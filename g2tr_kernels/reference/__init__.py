"""The readable pure-PyTorch path: the whole algorithm, and the oracle of the tests."""
from .anchor_scores import anchor_scores
from .balanced_topk import balanced_topk
from .budget import budget, cell_ids
from .merge import merge
from .reduce import reduce

__all__ = ["anchor_scores", "balanced_topk", "budget", "cell_ids", "merge", "reduce"]
