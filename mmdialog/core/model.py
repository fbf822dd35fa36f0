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

Inference: the LLM writes the turn; each ``[img] description [/img]`` goes
through the bridge to the generator, which draws the photo. With a retriever
in front (``library,sd``), a description that matches a real photo well
enough shares that photo and only the others are drawn.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from mmdialog.core import markup
from mmdialog.core.config import Config
from mmdialog.core.data.collate import IGNORE, Batch, Collator
from mmdialog.core.data.schema import Turn
from mmdialog.core.generation import GenerationOptions, Reply
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

if TYPE_CHECKING:
    from mmdialog.core.session import Session


class DialogueModel(nn.Module):
    def __init__(self, llm: LanguageModel, perceiver: Perceiver, bridge: Bridge,
                 generator: Generator, config: Config, retriever: Retriever | None = None) -> None:
        super().__init__()
        self.llm, self.perceiver, self.bridge, self.generator = llm, perceiver, bridge, generator
        self.retriever = retriever  # a module of its own: its weights never mix with the generator's
        self.config = config
        self.image_loss_weight = config.model.image_loss_weight
        self.collator = Collator(llm, perceiver, generator.resolution, config.model.max_length)

    def components(self) -> dict[str, nn.Module]:
        """Slot name → component: the four kinds, and the retriever when there is one."""
        out = {kind: getattr(self, kind) for kind in KINDS}
        if self.retriever is not None:
            out["retriever"] = self.retriever
        return out

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
    def respond(self, history: list[Turn], agent: str = "assistant", **options: Any) -> Reply:
        """Write the agent's next turn after ``history``; produce each described photo.

        Options: the fields of ``GenerationOptions``, and draw (False: decide and
        describe, but produce no photo).
        """
        return self.respond_batch([(history, agent)], **options)[0]

    @torch.no_grad()
    def respond_batch(self, requests: list[tuple[list[Turn], str]], draw: bool = True,
                      **options: Any) -> list[Reply]:
        """``respond`` for many (history, agent) pairs at once (left-padded batch)."""
        opts = GenerationOptions.parse(options)
        if opts.seed is not None:
            torch.manual_seed(opts.seed)
        device = next(self.parameters()).device
        prompts = [self.collator.prompt(h, a).to(device) for h, a in requests]
        embs = [self.input_embeddings(p)[0] for p in prompts]                 # each (T_i, D)
        t = max(e.shape[0] for e in embs)
        emb = embs[0].new_zeros(len(embs), t, embs[0].shape[-1])              # (B, T, D), left-padded
        mask = torch.zeros(len(embs), t, dtype=torch.long, device=device)
        for i, e in enumerate(embs):
            emb[i, t - e.shape[0]:] = e
            mask[i, t - e.shape[0]:] = 1
        out = self.llm.generate(emb, mask, max_new_tokens=opts.max_new_tokens, temperature=opts.temperature,
                                num_beams=opts.num_beams)                     # (B, T')
        rows, capped = [], []
        for row in out.tolist():
            stop = next((i for i, x in enumerate(row) if x in self.llm.stop_ids), None)
            rows.append(row[:stop])
            capped.append(stop is None)  # no end of turn: the reply hit max_new_tokens
        spans = [markup.spans(r, self.llm.img_open_id, self.llm.img_close_id) for r in rows]
        # The prompt format reads the reply back (the reference strips [INST] / [/INST]).
        replies = [Reply(self.collator.format.clean(self.llm.tokenizer.decode(r, skip_special_tokens=True)),
                         shared=bool(s),
                         length_capped=c) for r, s, c in zip(rows, spans, capped)]
        flat = [(i, s) for i, ss in enumerate(spans) for s in ss]
        if not flat:
            return replies
        width = max(1, max(len(s) for _, s in flat))
        ids = torch.tensor([s + [self.llm.pad_token_id] * (width - len(s)) for _, s in flat], device=device)
        valid = torch.tensor([[True] * len(s) + [False] * (width - len(s)) for _, s in flat], device=device)
        prompts = self.bridge(ids, valid)
        photos = self.share(prompts, opts) if draw else []
        for n, (i, _) in enumerate(flat):
            replies[i].descriptions.append(prompts[0].texts[n].strip())
            if photos:
                replies[i].photos.append(photos[n])
        return replies

    def share(self, prompts: list[PromptTokens], options: GenerationOptions) -> list[GeneratedImage]:
        """One photo per description: the retriever's match where it reaches its
        threshold (GILL's retrieve-or-generate decision), drawn by the generator otherwise."""
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
                                            guidance_scale=options.guidance_scale, seed=options.seed)
            for n, photo in zip(todo, drawn):
                if scores[n] is not None:  # the retriever's best match was not good enough
                    photo.score = scores[n]
                photos[n] = photo
        return photos  # type: ignore[return-value]

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


def _frozen_to_eval(module: nn.Module) -> None:
    """``eval()`` on each largest sub-module that has parameters, all frozen."""
    params = list(module.parameters())
    if params and not any(p.requires_grad for p in params):
        module.eval()
        return
    for child in module.children():
        _frozen_to_eval(child)
