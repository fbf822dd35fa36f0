"""bridge ``text``: the pipeline baseline. The description is decoded to text
and re-tokenised by the generator's own tokenizer; no gradient crosses.
Teacher-forced training uses the gold description (``source="gold"``), so the
image model trains on gold captions, separately from the text model, as in
the paper's pipeline baseline."""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from mmdialog.core.interfaces import Bridge, BuildContext, PluginOptions, PromptTokens, TextTower
from mmdialog.core.vocab import decode_text, embed_for_tower


class TextOptions(PluginOptions):
    source: Literal["gold", "predicted"] = Field(
        "gold", description="teacher forcing: feed the gold description, or the LLM's argmax")


class TextBridge(Bridge):
    Options = TextOptions
    differentiable = False

    def __init__(self, options: TextOptions, llm_tokenizer, towers: list[TextTower]) -> None:
        super().__init__()
        self.options = options
        self.llm_tokenizer = llm_tokenizer
        self.towers = towers

    @classmethod
    def from_options(cls, options: TextOptions, ctx: BuildContext) -> TextBridge:
        assert ctx.llm is not None and ctx.generator is not None
        return cls(options, ctx.llm.tokenizer, ctx.generator.text_towers)

    def parameter_groups(self) -> dict:
        return {}

    def forward(self, ids: torch.Tensor, mask: torch.Tensor,
                logits: torch.Tensor | None = None) -> list[PromptTokens]:
        if logits is not None and self.options.source == "predicted":
            ids = torch.where(mask, logits.argmax(-1), ids)
        texts = [decode_text(self.llm_tokenizer, ids[n][mask[n]].tolist()) for n in range(ids.shape[0])]
        with torch.no_grad():
            return [embed_for_tower(tower, texts)[1] for tower in self.towers]
