"""Per-turn evaluation with gold context (``evaluate.py``), the metrics
(``metrics/text.py``, ``metrics/image.py``) and the results table (``table.py``)."""
from mmdialog.core.evaluation.evaluate import GeneratedTurn, evaluate, generate_turns, score, write_results

__all__ = ["GeneratedTurn", "evaluate", "generate_turns", "score", "write_results"]
