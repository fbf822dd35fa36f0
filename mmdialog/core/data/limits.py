"""Size caps on one record, the same wherever data is read (``load_dialogues``:
``mmdialog data check``, training, evaluation). A turn is its text plus its
photos' descriptions; a record is all of its turns. Training right-truncates
each sample to ``model.max_length`` tokens anyway, so text far past that only
costs memory and time: a multi-gigabyte turn aborts the Rust tokenizer, taking
the whole run with it. A record over a cap is skipped and counted as a bad
record, like any other. Defaults: ``DataConfig.max_turn_chars`` /
``max_record_chars``."""
from __future__ import annotations

from mmdialog.core.data.schema import Dialogue, Turn

#: Characters per turn: about 5,000 tokens, ten times the paper's 512-token samples.
MAX_TURN_CHARS = 20_000
#: Characters per record (dialogue): PhotoChat's longest dialogues hold about 2,000.
MAX_RECORD_CHARS = 200_000


def turn_chars(turn: Turn) -> int:
    return len(turn.text) + sum(len(p.description or "") for p in turn.photos)


def oversize(dialogue: Dialogue, max_turn_chars: int = MAX_TURN_CHARS,
             max_record_chars: int = MAX_RECORD_CHARS) -> str | None:
    """Why ``dialogue`` is over a cap (one line), or None."""
    total = 0
    for i, turn in enumerate(dialogue.turns):
        n = turn_chars(turn)
        if n > max_turn_chars:
            return (f"turn {i + 1} holds {n:,} characters, over the cap of {max_turn_chars:,} "
                    "(data.max_turn_chars); skipped")
        total += n
    if total > max_record_chars:
        return (f"the record holds {total:,} characters, over the cap of {max_record_chars:,} "
                "(data.max_record_chars); skipped")
    return None
