"""Evaluation samples: gold context → next turn.

For a dialogue of turns ``t0 … tn`` there is one sample per turn ``ti``
(``i ≥ 1``, both speakers): context = the gold turns ``t0 … t(i-1)``, target =
``ti``. The first turn has no context and is skipped.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from mmdialog.core.data.schema import Dialogue, Turn


@dataclass(frozen=True)
class TurnSample:
    dialogue_id: str
    index: int  # index of ``target`` in the dialogue's turns (≥ 1)
    context: tuple[Turn, ...]
    target: Turn

    @property
    def speaker(self) -> str:
        return self.target.speaker

    @property
    def shares_photo(self) -> bool:
        """Gold intent: the target turn shares a photo."""
        return self.target.shares_photo

    @property
    def key(self) -> str:
        return f"{self.dialogue_id}#{self.index}"


def turn_samples(dialogue: Dialogue, *, speakers: Iterable[str] | None = None) -> list[TurnSample]:
    """Samples for every turn after the first (optionally only targets by ``speakers``)."""
    keep = None if speakers is None else {str(s) for s in speakers}
    turns = tuple(dialogue.turns)
    return [
        TurnSample(dialogue.id, i, turns[:i], turns[i])
        for i in range(1, len(turns))
        if keep is None or turns[i].speaker in keep
    ]


def dialogue_samples(dialogues: Iterable[Dialogue], *, speakers: Iterable[str] | None = None) -> list[TurnSample]:
    """``turn_samples`` over many dialogues, in order."""
    sp = None if speakers is None else list(speakers)
    return [s for d in dialogues for s in turn_samples(d, speakers=sp)]
