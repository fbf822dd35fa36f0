"""Dialogues → token batches the ``DialogueModel`` accepts.

A sample is one dialogue seen from one speaker, the *agent*. The LLM's prompt
format (``model.llm.prompt_format``, ``core/prompts.py``) decides the roles,
the samples a dialogue gives and which tokens are labelled: with ``template``
(default) the agent's turns are ``assistant`` messages (trained) and the other
speaker's ``user`` messages (context), one sample per speaker; with
``reference`` the first speaker is the user, one sample per dialogue, every
token trained. A photo appears, where it was shared in its turn, as

* ``[img] description [/img]`` in a turn the model learns to write (the
  assistant's; every turn with ``reference``) — its gold photo is the target of
  the image loss;
* K ``<image>`` placeholders after it, replaced by the perceiver's K
  embeddings, so later turns *see* the photo (end-to-end model);
* for a text perceiver, ``[img] caption [/img]`` in a context turn that shares it.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mmdialog.core import markup
from mmdialog.core.data.schema import Dialogue, Photo, Turn
from mmdialog.core.errors import DataError
from mmdialog.core.interfaces import LanguageModel, Perceiver
from mmdialog.core.prompts import PromptFormat, TemplateFormat

IGNORE = -100
#: A photo whose encoder outputs are all stored: its pixels are never decoded (``Collator.stores``).
STORED = "stored"
ImageLoader = Callable[[Path, int], torch.Tensor]  # (path, size) -> (3, size, size) in [0, 1]


@dataclass
class Batch:
    """Shapes: B samples, T tokens, P perceived photos, N description spans, L ≤ span length."""

    input_ids: torch.Tensor        # (B, T) long; <image> at perceived-photo slots
    attention_mask: torch.Tensor   # (B, T) long
    labels: torch.Tensor           # (B, T) long, IGNORE outside the agent's turns
    photo_slots: torch.Tensor      # (P, 2) long: (sample, first of K positions)
    photo_pixels: torch.Tensor     # (P, 3, H_p, W_p) float in [0, 1]; (P, 3, 0, 0) when all are stored
    photo_keys: list[str]          # (P,) each perceived photo's content key, for the feature store
    desc_index: torch.Tensor       # (N,) long: sample of each description span
    desc_start: torch.Tensor       # (N,) long: first description token (after [img])
    desc_len: torch.Tensor         # (N,) long
    desc_pixels: torch.Tensor      # (N, 3, H_g, W_g) float; zeros where missing; (N, 3, 0, 0) when stored
    desc_has_image: torch.Tensor   # (N,) bool: gold photo available for the image loss
    desc_keys: list[str]           # (N,) the gold photo's content key ("" when missing), for the store
    shares_photo: torch.Tensor     # (B,) bool: the agent shares a photo in this sample
    stats: dict[str, int] = field(default_factory=dict)
    ids: list[str] = field(default_factory=list)  # "dialogue_id@agent" of each sample

    def to(self, device) -> Batch:
        return Batch(**{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in self.__dict__.items()})

    def __len__(self) -> int:
        return self.input_ids.shape[0]


class Collator:
    """Builds ``Batch`` objects for a given LLM, perceiver and generator resolution,
    with the prompt format the assembler hands it (``model.llm.prompt_format``)."""

    def __init__(self, llm: LanguageModel, perceiver: Perceiver, prompt_format: PromptFormat,
                 generator_resolution: int, max_length: int, image_loader: ImageLoader | None = None) -> None:
        self.llm, self.perceiver = llm, perceiver
        self.k = perceiver.num_tokens if perceiver.kind == "pixels" else 0
        self.gen_res = generator_resolution
        self.max_length = max_length
        self.load_image = image_loader or default_image_loader
        self.format = prompt_format
        # "perceiver"/"generator" → FeatureStore (``DialogueModel.use_feature_stores``): a photo the
        # store holds whole is left out of a training batch's pixels (core/caching.py).
        self.stores: dict = {}

    # -- messages ---------------------------------------------------------------------------
    def written(self, turns: list[Turn], agent: str) -> list[bool]:
        """Per turn: does the model learn to write it (so its photos are descriptions)?"""
        roles = self.format.roles([t.speaker for t in turns], agent)
        return [self.format.scores_all or r == "assistant" for r in roles]

    def messages(self, turns: list[Turn], agent: str) -> list[dict[str, str]]:
        """Chat messages for ``turns`` seen by ``agent``, arranged by the prompt format;
        consecutive turns of one role merge."""
        msgs: list[dict[str, str]] = []
        roles = self.format.roles([t.speaker for t in turns], agent)
        for turn, role, written in zip(turns, roles, self.written(turns, agent)):
            # Each photo where it was shared in the turn (the reference does so), not after the text.
            content = turn.text_with_photos(lambda p, w=written: self.photo_text(p, w))
            if msgs and msgs[-1]["role"] == role:
                msgs[-1]["content"] += " " + content
            else:
                msgs.append({"role": role, "content": content})
        return self.format.arrange(msgs)

    def samples(self, dialogues: list[Dialogue], both_speakers: bool = True) -> list[tuple[Dialogue, str]]:
        """(dialogue, agent) training samples, as the prompt format makes them."""
        return training_samples(dialogues, both_speakers, self.format)

    def photo_text(self, photo: Photo, shared_by_agent: bool) -> str:
        seen = self.k > 0 and photo.path is not None
        slots = markup.IMAGE_TOKEN * self.k if seen else ""
        if shared_by_agent:
            return markup.render(photo.description) + slots
        if self.perceiver.kind == "text":
            return markup.render(self.perceiver.caption(photo))
        # A pixel perceiver that has no pixels falls back to the description.
        return slots or markup.render(photo.description)

    # -- one sample --------------------------------------------------------------------------
    def encode(self, dialogue: Dialogue, agent: str) -> dict:
        msgs = self.messages(dialogue.turns, agent)
        text = self.format.render(msgs)
        enc = self.llm.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"][: self.max_length], enc["offset_mapping"][: self.max_length]
        if self.format.scores_all:  # every token of the sample (the reference's loss)
            labels = list(ids)
        else:
            # A token is labelled when it overlaps an assistant span: SentencePiece tokens carry the
            # space before a word ("▁hey"), so the first word of a Llama-2 turn starts before the span.
            spans = self.format.assistant_spans(msgs, text)
            labels = [i if any(a < e and b > s for s, e in spans) else IGNORE for i, (a, b) in zip(ids, offsets)]
        labels = [IGNORE if i == self.llm.image_token_id else lab for i, lab in zip(ids, labels)]
        # What the agent writes after a photo it shared is trained from both places inference
        # goes on from: the last of the K slots (the photo produced and perceived) and the
        # agent's [/img] itself (no photo: draw=False, or one whose file cannot be read), whose
        # target is the first slot's label.
        for c in range(len(ids) - 1 - self.k):
            if ids[c] == self.llm.img_close_id and labels[c] != IGNORE and ids[c + 1] == self.llm.image_token_id:
                labels[c + 1] = labels[c + 1 + self.k]
        photos = [p for t in dialogue.turns for p in t.ordered_photos]
        written = self.written(dialogue.turns, agent)
        agent_photos = [p for t, w in zip(dialogue.turns, written) if w for p in t.ordered_photos]
        # The [img] of each description span the model writes (not one the system prompt names).
        start = self.format.dialogue_start(text)
        opens = [i for i, (x, lab, (a, _)) in enumerate(zip(ids, labels, offsets))
                 if x == self.llm.img_open_id and lab != IGNORE and a >= start]
        return {"ids": ids, "labels": labels, "photos": photos, "agent_photos": agent_photos,
                "opens": opens, "shares": bool(agent_photos)}

    def photo_slots(self, row: list[int], photos: list[Photo]) -> list[tuple[int, Photo]]:
        """(position, photo) of each run of K <image> ids, in order of the photos with pixels."""
        seen = iter([p for p in photos if p.path is not None])
        out, pos = [], 0
        while self.k and pos < len(row):
            if row[pos] == self.llm.image_token_id:
                out.append((pos, next(seen)))
                pos += self.k
            else:
                pos += 1
        return out

    def prompt_text(self, turns: list[Turn], agent: str) -> str:
        """The text after which the model writes the agent's next turn."""
        return self.format.prompt(self.messages(turns, agent))

    def prompt(self, turns: list[Turn], agent: str) -> Batch:
        """A one-sample batch that ends with the agent's generation prompt."""
        row = self.llm.tokenizer(self.prompt_text(turns, agent), add_special_tokens=False)["input_ids"]
        photos = [p for t in turns for p in t.ordered_photos]
        found = self.photo_slots(row, photos)
        size = self.perceiver.image_size
        empty = torch.zeros(0, dtype=torch.long)
        return Batch(
            input_ids=torch.tensor([row]), attention_mask=torch.ones(1, len(row), dtype=torch.long),
            labels=torch.full((1, len(row)), IGNORE),
            photo_slots=torch.tensor([(0, pos) for pos, _ in found], dtype=torch.long).view(-1, 2),
            photo_pixels=torch.stack([self.load_image(p.path, size) for _, p in found]) if found
            else torch.zeros(0, 3, size, size), photo_keys=[str(p.path) for _, p in found],
            desc_index=empty, desc_start=empty, desc_len=empty,
            desc_pixels=torch.zeros(0, 3, self.gen_res, self.gen_res),
            desc_has_image=torch.zeros(0, dtype=torch.bool), desc_keys=[],
            shares_photo=torch.zeros(1, dtype=torch.bool))

    def _readable(self, photo: Photo, size: int, stats: dict[str, int], encoder: str
                  ) -> tuple[str, torch.Tensor | str] | None:
        """(the photo's store key, its pixels or ``STORED``), or None (counted) when its
        file broke after the data was checked: training never dies on a photo; that
        sample trains the text."""
        from mmdialog.core.caching import content_key

        try:
            key = content_key(photo.path)
            store = self.stores.get(encoder)
            if store is not None and store.complete(key):
                return key, STORED
            return key, self.load_image(photo.path, size)
        except (DataError, OSError):
            stats["photos_unreadable"] += 1
            return None

    @staticmethod
    def _pixels(rows: list[torch.Tensor | str | None], size: int) -> torch.Tensor:
        """(N, 3, size, size); (N, 3, 0, 0) when every photo is ``STORED`` (None: no photo).
        In a batch that mixes, a stored photo's row is NaN, never a real image."""
        if rows and all(r is None or r is STORED for r in rows) and STORED in rows:
            return torch.zeros(len(rows), 3, 0, 0)
        return torch.stack([torch.full((3, size, size), float("nan")) if r is STORED else
                            torch.zeros(3, size, size) if r is None else r for r in rows]) if rows \
            else torch.zeros(0, 3, size, size)

    # -- batch -------------------------------------------------------------------------------
    def __call__(self, samples: list[tuple[Dialogue, str]]) -> Batch:
        encoded = [self.encode(d, a) for d, a in samples]
        t = max(len(e["ids"]) for e in encoded)
        pad = self.llm.pad_token_id
        ids = torch.full((len(encoded), t), pad, dtype=torch.long)
        mask = torch.zeros((len(encoded), t), dtype=torch.long)
        labels = torch.full((len(encoded), t), IGNORE, dtype=torch.long)
        slots, slot_px, slot_keys, d_idx, d_start, d_len, d_px, d_has, d_keys = [], [], [], [], [], [], [], [], []
        stats = {"photos_missing": 0, "spans_truncated": 0, "photos_unreadable": 0}
        for b, e in enumerate(encoded):
            n = len(e["ids"])
            ids[b, :n] = torch.tensor(e["ids"])
            mask[b, :n] = 1
            labels[b, :n] = torch.tensor(e["labels"])
            row = e["ids"]
            for pos, photo in self.photo_slots(row, e["photos"]):
                got = self._readable(photo, self.perceiver.image_size, stats, "perceiver") \
                    if pos + self.k <= n else None
                if got is not None:
                    slots.append((b, pos))
                    slot_keys.append(got[0])
                    slot_px.append(got[1])
                else:  # truncated mid-photo, or unreadable since the data was checked: hide the slots
                    mask[b, pos:min(pos + self.k, n)] = 0
                    # and predict the token after them from [/img] only, not from a hidden slot
                    labels[b, pos + self.k:pos + self.k + 1] = IGNORE
            # Description spans in the agent's (labelled) turns, in order of its photos.
            agent_photos = iter(e["agent_photos"])
            for o in e["opens"]:
                photo = next(agent_photos, None)
                try:
                    close = row.index(self.llm.img_close_id, o + 1)
                except ValueError:
                    stats["spans_truncated"] += 1
                    continue
                d_idx.append(b)
                d_start.append(o + 1)
                d_len.append(close - o - 1)
                got = self._readable(photo, self.gen_res, stats, "generator") \
                    if photo is not None and photo.path else None
                stats["photos_missing"] += got is None
                d_has.append(got is not None)
                d_keys.append(got[0] if got is not None else "")
                d_px.append(got[1] if got is not None else None)
        p_size = self.perceiver.image_size
        return Batch(
            input_ids=ids, attention_mask=mask, labels=labels,
            photo_slots=torch.tensor(slots, dtype=torch.long).view(-1, 2),
            photo_pixels=self._pixels(slot_px, p_size),
            photo_keys=slot_keys,
            desc_index=torch.tensor(d_idx, dtype=torch.long), desc_start=torch.tensor(d_start, dtype=torch.long),
            desc_len=torch.tensor(d_len, dtype=torch.long),
            desc_pixels=self._pixels(d_px, self.gen_res),
            desc_has_image=torch.tensor(d_has, dtype=torch.bool), desc_keys=d_keys,
            shares_photo=torch.tensor([e["shares"] for e in encoded], dtype=torch.bool),
            stats=stats, ids=[f"{d.id}@{a}" for d, a in samples])


def default_image_loader(path: Path, size: int) -> torch.Tensor:
    from mmdialog.core.data.images import load_image, to_tensor

    return to_tensor(load_image(path), size)


def training_samples(dialogues: list[Dialogue], both_speakers: bool = True,
                     prompt_format: PromptFormat | None = None) -> list[tuple[Dialogue, str]]:
    """(dialogue, agent) pairs: every speaker as the agent, or only the sharers
    (``template``); one per dialogue (``reference``)."""
    fmt = prompt_format or TemplateFormat(None)
    out = []
    for d in dialogues:
        sharers = [t.speaker for t in d.turns if t.photos]
        out.extend((d, a) for a in fmt.agents(d.speakers, sharers, both_speakers))
    return out
