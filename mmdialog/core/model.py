"""DialogueModel: the plain composite of the four components.

Training (teacher forcing, docs/design.md §1):

    embeddings = LLM.embed(ids), with each photo's K slots ← Perceiver(photo)
    logits     = LLM(embeddings) at the positions that predict a label  # (S, V)
    L_text     = CE(logits, the labels they predict)
    prompts    = Bridge(description ids, logits predicting them)  # per text tower
    L_img      = Generator.loss(Generator.encode(prompts), gold photo)
    loss       = L_text + λ · L_img

With the ``gumbel`` bridge, ∂L_img reaches the LLM (and the perceiver)
through the description logits; with the ``text`` bridge it stops there.

Inference (the photo in the loop): the LLM writes the turn up to ``[/img]``;
the description goes through the bridge to the generator, which draws the
photo; the perceiver's K embeddings of that photo follow ``[/img]``, as in
training, and the LLM writes on after it. With a retriever in front
(``library,sd``), a description that matches a real photo well enough shares
that photo and only the others are drawn. Replies can stream (text deltas and
photos as they are produced).
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from mmdialog.core import markup
from mmdialog.core.collator import IGNORE, Batch, Collator
from mmdialog.core.config import Config
from mmdialog.core.data.schema import Turn
from mmdialog.core.interfaces import (
    KINDS,
    Bridge,
    GeneratedImage,
    Generator,
    LanguageModel,
    Perceiver,
    PromptTokens,
    Retriever,
)
from mmdialog.core.reply import GenerationOptions, Reply, StreamCallback, TextDeltas

if TYPE_CHECKING:
    from mmdialog.core.caching import FeatureStore
    from mmdialog.core.prompts import PromptFormat
    from mmdialog.core.session import Session


class DialogueModel(nn.Module):
    def __init__(self, llm: LanguageModel, perceiver: Perceiver, bridge: Bridge,
                 generator: Generator, config: Config, prompt_format: PromptFormat,
                 retriever: Retriever | None = None) -> None:
        super().__init__()
        self.llm, self.perceiver, self.bridge, self.generator = llm, perceiver, bridge, generator
        self.retriever = retriever  # a module of its own: its weights never mix with the generator's
        self.config = config
        self.image_loss_weight = config.model.image_loss_weight
        self.collator = Collator(llm, perceiver, prompt_format, generator.resolution, config.model.max_length)

    def components(self) -> dict[str, nn.Module]:
        """Slot name → component: the four kinds, and the retriever when there is one."""
        out = {kind: getattr(self, kind) for kind in KINDS}
        if self.retriever is not None:
            out["retriever"] = self.retriever
        return out

    def use_feature_stores(self, root: str | None = None) -> dict[str, FeatureStore]:
        """Open the perceiver's and the generator's feature stores under ``root`` (default
        ``$MMDIALOG_CACHE/features``; ``core/caching.py``) and hand them to the collator, whose
        training batches then leave out the pixels of photos the stores hold."""
        stores = {kind: store for kind in ("perceiver", "generator")
                  if (store := getattr(self, kind).feature_store(root)) is not None}
        self.collator.stores = stores
        return stores

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """``component.group`` → parameters: the freeze policy's keys."""
        return {f"{kind}.{name}": params for kind, comp in self.components().items()
                for name, params in comp.parameter_groups().items()}

    def train(self, mode: bool = True) -> DialogueModel:
        """Parts the freeze policy froze stay in eval mode while the rest trains:
        no dropout inside a frozen Q-Former or text tower (BLIP-2 trains with its
        frozen ViT in eval mode), so a frozen part is a fixed function."""
        super().train(mode)
        if mode:
            _frozen_to_eval(self)
        return self

    # -- training -------------------------------------------------------------------------
    def input_embeddings(self, batch: Batch) -> torch.Tensor:
        emb = self.llm.embed(batch.input_ids)                                # (B, T, D)
        if batch.photo_slots.numel():
            vis = self.perceiver(batch.photo_pixels, batch.photo_keys)       # (P, K, D)
            k = vis.shape[1]
            b = batch.photo_slots[:, :1].expand(-1, k)                       # (P, K)
            t = batch.photo_slots[:, 1:] + torch.arange(k, device=emb.device)
            emb = emb.index_put((b.reshape(-1), t.reshape(-1)), vis.reshape(-1, vis.shape[-1]).to(emb.dtype))
        return emb

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        targets = batch.labels[:, 1:]                                        # (B, T-1)
        scored = F.pad(targets != IGNORE, (0, 1), value=False)              # (B, T): positions that predict
        logits = self.llm(self.input_embeddings(batch), batch.attention_mask, scored)  # (S, V)
        text_loss = F.cross_entropy(logits.float(), targets[scored[:, :-1]])
        image_loss = logits.new_zeros((), dtype=torch.float32)
        use = batch.desc_has_image
        if self.image_loss_weight > 0 and bool(use.any()):
            row_of = torch.full(scored.shape, -1, dtype=torch.long, device=logits.device)
            row_of[scored] = torch.arange(logits.shape[0], device=logits.device)  # (B, T) → logits row
            starts, lens, rows = batch.desc_start[use], batch.desc_len[use], batch.desc_index[use]
            ar = torch.arange(int(lens.max().clamp(min=1)), device=logits.device)
            valid = ar[None] < lens[:, None]                                 # (N, L)
            pos = (starts[:, None] + ar[None]).clamp(max=scored.shape[1] - 1)
            b = rows[:, None].expand_as(pos)
            ids = batch.input_ids[b, pos]                                    # (N, L)
            # Description tokens are labelled, so their predicting positions were scored.
            span_logits = logits[row_of[b, pos - 1].clamp(min=0)]            # (N, L, V): predictions of ids
            prompts = self.bridge(ids, valid, span_logits)
            keys = [k for k, u in zip(batch.desc_keys, use.tolist()) if u]
            image_loss = self.generator.loss(self.generator.encode(prompts), batch.desc_pixels[use], keys)
        # Both parts keep their graphs, so each can be back-propagated alone.
        return {"loss": text_loss + self.image_loss_weight * image_loss, "text_loss": text_loss,
                "image_loss": image_loss, "image_samples": use.sum()}

    # -- inference ------------------------------------------------------------------------
    @torch.no_grad()
    def respond(self, history: list[Turn], agent: str = "assistant",
                stream: Callable[[str | GeneratedImage], None] | None = None, **options: Any) -> Reply:
        """Write the agent's next turn after ``history``; produce each described photo.

        Options: the fields of ``GenerationOptions``, and draw (False: decide and
        describe, but produce no photo). ``stream``: called with each piece of the
        reply as it is written, text deltas and photos (``respond_batch``'s contract,
        one row).
        """
        row_stream = None if stream is None else lambda _, piece: stream(piece)
        return self.respond_batch([(history, agent)], stream=row_stream, **options)[0]

    @torch.no_grad()
    def respond_batch(self, requests: list[tuple[list[Turn], str]], draw: bool = True,
                      stream: StreamCallback | None = None, options: GenerationOptions | None = None,
                      keys: list[str] | None = None, **fields: Any) -> list[Reply]:
        """``respond`` for many (history, agent) pairs at once (left-padded batch).

        The photo is in the loop, as training lays it out: each row's generation
        stops at ``[/img]``; the photo is produced (``share``: retrieved or drawn),
        perceived (its K perceiver embeddings follow ``[/img]``, as the collator's
        ``<image>`` slots do; a text perceiver's own photo is its description, so
        nothing follows) and the row goes on from there until the end of its turn.
        Rows that end are done; the others continue together. ``max_new_tokens``
        counts the reply's tokens over all its pieces (the perceived slots are not
        tokens). After ``max_photos`` photos a row can no longer open ``[img]``.
        With ``draw=False`` no photo exists, so the row goes on right after
        ``[/img]``: the layout of a shared photo without pixels, whose next token
        training also scores from ``[/img]`` (``Collator.encode``). Each piece after
        a ``[/img]`` starts with a fresh prefill of the row's context (no KV cache
        is carried over).

        ``stream(i, piece)``, when given, is called as row i is written: text
        deltas (``str``) whose concatenation is exactly ``replies[i].text``
        (markup included; the text up to ``[/img]`` arrives before that photo),
        and each ``GeneratedImage`` as soon as it is produced, in the order of
        ``replies[i].photos``. Greedy and sampled decoding stream token by token;
        beam search delivers each piece's text when the piece ends. Rows
        interleave; the pieces of one row are in order. ``photo_in_loop=False``
        is the reference's decoding: one piece per turn, ``[/img]`` an ordinary
        token, a photo afterwards for each closed, non-empty description.

        ``options``: ``GenerationOptions`` parsed already (a session's); or their ``fields`` as keywords.

        The steps, as diffusers' ``__call__`` lays out a pipeline: 1. prompt,
        then per piece 2. write (``_write``), 3. produce (``_describe``: bridge,
        then ``share``), 4. perceive (``_perceive_into``).

        Photo noise: with a ``seed``, each request's k-th photo starts from noise
        seeded by (seed, the request's key, k) (``noise_seed``): the same photo
        whatever the batch it is in and its place there, and a new noise for
        every turn. ``keys`` name the requests (an evaluation passes each turn's
        key); by default a request's key is a digest of its history and agent,
        so a session's next reply, whose history has grown, draws new noise.
        """
        if options is not None and fields:
            raise TypeError(f"respond_batch: give options or their fields, not both ({', '.join(fields)})")
        opts = options if options is not None else GenerationOptions.parse(fields)
        if opts.seed is not None:
            torch.manual_seed(opts.seed)
        emit = stream or (lambda i, piece: None)
        # 1. Prompt: each request's context as embeddings, one row each.
        device = next(self.parameters()).device
        keys = keys or [request_key(h, a) for h, a in requests]
        rows = [_Row(n, self.input_embeddings(self.collator.prompt(h, a).to(device))[0], TextDeltas(self._decode),
                     key) for n, ((h, a), key) in enumerate(zip(requests, keys))]
        while active := [r for r in rows if not r.done]:
            # 2. Write: the active rows decode together up to [/img], the end of their turn or their budget.
            added = self._write(active, opts, emit if stream else None)
            for r in active:
                if delta := r.text.update(r.ids, final=r.done):
                    emit(r.index, delta)
            # 3. Produce: each description a row completed goes through the bridge; its photo is shared.
            photos = self._describe(active, opts, draw)
            for r in active:
                for photo in photos.get(r.index, []):
                    emit(r.index, photo)
            # 4. Perceive: a row going on appends its new tokens and its photo's K embeddings to its context.
            self._perceive_into(active, added, photos)
        return [r.reply(self._decode) for r in rows]

    def _decode(self, ids: list[int]) -> str:
        # The prompt format reads the reply back (the reference's strips [INST] / [/INST]).
        return self.collator.format.clean(self.llm.tokenizer.decode(ids, skip_special_tokens=True))

    def _write(self, active: list[_Row], opts: GenerationOptions,
               emit: StreamCallback | None) -> list[list[int]]:
        """Step 2: one ``generate`` over the active rows (left-padded); each row keeps
        its piece (``_piece_end``) and learns whether it is done. The new tokens per row."""
        llm = self.llm
        emb, mask = _left_pad([r.context for r in active])                   # (B', T, D), (B', T)
        budgets = [opts.max_new_tokens - len(r.ids) for r in active]
        seen: list[list[int]] = [[] for _ in active]

        def on_step(tokens: list[int]) -> None:
            for r, got, budget, token in zip(active, seen, budgets, tokens):
                got.append(token)
                keep, _ = self._piece_end(got, budget, opts.photo_in_loop)
                if delta := r.text.update(r.ids + got[:keep]):
                    emit(r.index, delta)

        # The reference decodes a whole turn, [/img] an ordinary token (photo_in_loop false).
        stop_ids = [*llm.stop_ids, llm.img_close_id] if opts.photo_in_loop else list(llm.stop_ids)
        out = llm.generate(emb, mask, max_new_tokens=max(budgets), temperature=opts.temperature,
                           top_p=opts.top_p, num_beams=opts.num_beams, stop_ids=stop_ids,
                           suppress=[[llm.img_open_id, llm.img_close_id] if len(r.spans) >= opts.max_photos
                                     else [] for r in active],
                           on_step=on_step if emit is not None else None)     # (B', T')
        added = []
        for r, new, budget in zip(active, out.tolist(), budgets):
            keep, end = self._piece_end(new, budget, opts.photo_in_loop)
            added.append(new[:keep])
            r.ids += new[:keep]
            r.capped = end == "limit" or (end == "photo" and len(r.ids) >= opts.max_new_tokens)
            r.done = end != "photo" or r.capped
        return added

    def _perceive_into(self, active: list[_Row], added: list[list[int]],
                       photos: dict[int, list[GeneratedImage]]) -> None:
        """Step 4: each row going on gets its new tokens' embeddings and, with a pixel
        perceiver, its photo's K embeddings (where training puts the ``<image>`` slots)."""
        device = next(self.parameters()).device
        going = [(r, new) for r, new in zip(active, added) if not r.done]
        seen_photo = [r for r, _ in going if r.index in photos and self.perceiver.kind == "pixels"]
        vis = self._perceive([photos[r.index][0] for r in seen_photo], device)  # (N, K, D)
        for r, new in going:
            parts = [r.context, self.llm.embed(torch.tensor([new], device=device))[0]]
            if r in seen_photo:
                parts.append(vis[seen_photo.index(r)].to(r.context.dtype))
            r.context = torch.cat(parts)                                     # (T + n (+ K), D)

    def _piece_end(self, tokens: list[int], budget: int, photo_stop: bool = True) -> tuple[int, str]:
        """How many of a piece's new ``tokens`` the reply keeps, and why it stops there:
        ``turn`` (end of turn, not kept), ``photo`` (``[/img]``, kept, when ``photo_stop``) or ``limit``."""
        for n, token in enumerate(tokens[:budget]):
            if token in self.llm.stop_ids:
                return n, "turn"
            if photo_stop and token == self.llm.img_close_id:
                return n + 1, "photo"
        return min(len(tokens), budget), "limit"

    def _describe(self, rows: list[_Row], opts: GenerationOptions, draw: bool) -> dict[int, list[GeneratedImage]]:
        """Each description the rows completed in this piece (or left open at their end):
        its text through the bridge, and its photo when ``draw``. Row index → photos."""
        closed = not opts.photo_in_loop  # the reference draws only closed, non-empty descriptions
        found = [(r, s) for r in rows
                 for s in markup.spans(r.ids, self.llm.img_open_id, self.llm.img_close_id, closed)[r.spans_seen:]]
        for r, _ in found:
            r.spans_seen += 1
        # "[img] [/img]" (nothing but spaces between) describes nothing: no description, no photo.
        flat = [(r, s) for r, s in found if self.llm.tokenizer.decode(s, skip_special_tokens=True).strip()]
        if not flat:
            return {}
        device = next(self.parameters()).device
        width = max(1, max(len(s) for _, s in flat))
        ids = torch.tensor([s + [self.llm.pad_token_id] * (width - len(s)) for _, s in flat], device=device)
        valid = torch.tensor([[True] * len(s) + [False] * (width - len(s)) for _, s in flat], device=device)
        prompts = self.bridge(ids, valid)
        places = []  # each description's place in its reply
        for (r, _), text in zip(flat, prompts[0].texts):
            places.append(len(r.spans))
            r.spans.append(text.strip())
        if not draw:
            return {}
        # Each photo its own noise, from its row's key and its place in the reply (not the batch's).
        seeds = None if opts.seed is None else \
            [noise_seed(opts.seed, r.key, k) for (r, _), k in zip(flat, places)]
        out: dict[int, list[GeneratedImage]] = {}
        for (r, _), photo in zip(flat, self.share(prompts, opts, seeds)):
            r.photos.append(photo)
            out.setdefault(r.index, []).append(photo)
        return out

    def _perceive(self, photos: list[GeneratedImage], device: torch.device) -> torch.Tensor:
        """The perceiver's K embeddings of photos just produced (N, K, D), as the
        collator's loader feeds it: centre crop, ``perceiver.image_size``, [0, 1]."""
        from mmdialog.core.data.images import to_tensor

        if not photos:
            return torch.zeros(0)
        size = self.perceiver.image_size
        pixels = torch.stack([to_tensor(p.image, size) for p in photos]).to(device)   # (N, 3, H, W)
        return self.perceiver(pixels, [str(p.file) if p.file else "" for p in photos])

    def share(self, prompts: list[PromptTokens], options: GenerationOptions,
              seeds: list[int] | None = None) -> list[GeneratedImage]:
        """One photo per description: the retriever's match where it reaches its
        threshold (GILL's retrieve-or-generate decision), drawn by the generator otherwise.
        ``seeds``: one noise seed per description (default: ``options.seed`` for the batch)."""
        texts = [t.strip() for t in prompts[0].texts]
        photos: list[GeneratedImage | None] = [None] * len(texts)
        scores: list[float | None] = [None] * len(texts)
        if self.retriever is not None:
            for n, match in enumerate(self.retriever.match(texts)):
                scores[n] = match.score
                if match.score >= self.retriever.threshold:
                    photos[n] = self.retriever.retrieve(match)
        todo = [n for n, p in enumerate(photos) if p is None]
        if todo:
            rows = torch.tensor(todo, dtype=torch.long)
            subset = [PromptTokens(p.input_ids[rows.to(p.input_ids.device)],
                                   p.inputs_embeds[rows.to(p.inputs_embeds.device)], [p.texts[n] for n in todo])
                      for p in prompts]
            drawn = self.generator.generate(self.generator.encode(subset),
                                            num_inference_steps=options.num_inference_steps,
                                            guidance_scale=options.guidance_scale,
                                            seed=[seeds[n] for n in todo] if seeds else options.seed)
            for n, photo in zip(todo, drawn):
                if scores[n] is not None:  # the retriever's best match was not good enough
                    photo.score = scores[n]
                photos[n] = photo
        return photos  # type: ignore[return-value]

    def save_pretrained(self, save_directory: str | Path, metrics: dict[str, Any] | None = None, *,
                        overwrite: bool = True) -> Path:
        """Write the trained weights, config, tokenizer additions and a model card
        to ``save_directory``; ``mmdialog.load(save_directory)`` reads it back."""
        from mmdialog.core.export import save_pretrained

        return save_pretrained(self, save_directory, metrics, overwrite=overwrite)

    def session(self, **options: Any) -> Session:
        """A conversation with history: ``session(seed=0).send("hi", images=[...])``
        (``mmdialog.Session``; options: photos_dir, history and the ``GenerationOptions``)."""
        from mmdialog.core.session import Session

        return Session(self, **options)

    def summary(self) -> dict[str, dict[str, int]]:
        out = {}
        for name, comp in self.components().items():
            params = {id(p): p for p in comp.parameters()}.values()
            out[name] = {"params": sum(p.numel() for p in params),
                         "trainable": sum(p.numel() for p in params if p.requires_grad)}
        return out


@dataclass(eq=False)
class _Row:
    """One reply being written: its context so far (prompt, the reply's tokens and
    the perceived photos, as embeddings), tokens, descriptions and photos."""

    index: int
    context: torch.Tensor                                   # (T, D)
    text: TextDeltas
    key: str = ""                                           # names the request: its photos' noise
    ids: list[int] = field(default_factory=list)
    spans: list[str] = field(default_factory=list)         # description texts, in order
    spans_seen: int = 0                                     # [img] spans written so far, empty ones included
    photos: list[GeneratedImage] = field(default_factory=list)
    done: bool = False
    capped: bool = False

    def reply(self, decode: Callable[[list[int]], str]) -> Reply:
        return Reply(decode(self.ids).strip(), photos=self.photos, shared=bool(self.spans),
                     descriptions=self.spans, length_capped=self.capped)


def request_key(history: list[Turn], agent: str) -> str:
    """A request's default key: a digest of its history and agent."""
    text = json.dumps([agent, *[[t.speaker, t.text_with_photos()] for t in history]], ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def noise_seed(seed: int, key: str, photo: int) -> int:
    """The diffusion seed of a request's ``photo``-th photo: a hash of (seed, key,
    photo), so it depends on neither the batch nor the request's place in it."""
    digest = hashlib.sha256(f"{seed}/{key}/{photo}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % 2**63


def _left_pad(embs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of embeddings (T_i, D) → a left-padded batch (B, T, D) and its mask (B, T)."""
    t = max(e.shape[0] for e in embs)
    emb = embs[0].new_zeros(len(embs), t, embs[0].shape[-1])                 # (B, T, D)
    mask = torch.zeros(len(embs), t, dtype=torch.long, device=emb.device)
    for i, e in enumerate(embs):
        emb[i, t - e.shape[0]:] = e
        mask[i, t - e.shape[0]:] = 1
    return emb, mask


def _frozen_to_eval(module: nn.Module) -> None:
    """``eval()`` on each largest sub-module that has parameters, all frozen."""
    params = list(module.parameters())
    if params and not any(p.requires_grad for p in params):
        module.eval()
        return
    for child in module.children():
        _frozen_to_eval(child)
