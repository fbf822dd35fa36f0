"""A complete third-party generator plugin and dataset format (the README's "Writing a plugin").

tests/test_plugin_api.py installs this file as a package with an entry point,
trains two steps on a file in the ``chatlog`` format and chats with the result.
"""
import json
from pathlib import Path

import torch
from torch import nn

from mmdialog import (
    DatasetFormat,
    Dialogue,
    GeneratedImage,
    Generator,
    Photo,
    Plugin,
    PluginOptions,
    RecordError,
    TextTower,
    Turn,
    hookimpl,
)


class PaletteOptions(PluginOptions):
    width: int = 32       # text embedding width
    resolution: int = 32  # side of the photos it paints


class PaletteGenerator(Generator):
    """Paints a 4 × 4 grid of colours from the description's mean embedding.

    Its text tower reads the LLM's own tokenizer, so any bridge can feed it;
    its loss is the pixel MSE against the gold photo, so the gumbel bridge
    carries that loss back into the LLM.
    """

    Options = PaletteOptions
    trainable_by_default = ("decoder", "text_encoder")

    def __init__(self, options: PaletteOptions, tokenizer) -> None:
        super().__init__()
        self.embedding = nn.Embedding(len(tokenizer), options.width)
        self.decoder = nn.Linear(options.width, 3 * 4 * 4)
        self.text_towers = [TextTower(tokenizer, self.embedding, max_length=32)]
        self.resolution = options.resolution

    @classmethod
    def from_options(cls, options, ctx):
        return cls(options, ctx.llm.tokenizer)

    def parameter_groups(self):
        return {"decoder": list(self.decoder.parameters()), "text_encoder": [self.embedding.weight]}

    def encode(self, prompts):
        p = prompts[0]
        mask = (p.input_ids != p.input_ids[:, -1:]).float()[..., None]        # (N, S, 1): not padding
        mask[:, 0] = 1.0
        return (p.inputs_embeds * mask).sum(1) / mask.sum(1)                   # (N, d)

    def paint(self, conditioning):
        grid = torch.sigmoid(self.decoder(conditioning)).view(-1, 3, 4, 4)     # (N, 3, 4, 4)
        return nn.functional.interpolate(grid, size=self.resolution)           # (N, 3, R, R)

    def loss(self, conditioning, pixels, keys=None):
        return nn.functional.mse_loss(self.paint(conditioning), pixels.to(conditioning.dtype))

    @torch.no_grad()
    def generate(self, conditioning, **options):
        from PIL import Image

        images = (self.paint(conditioning) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
        return [GeneratedImage(Image.fromarray(a), "drawn", "palette") for a in images]


def is_chatlog(record) -> bool:
    return isinstance(record, dict) and "chatlog" in record


def parse_chatlog(raw, *, file, report, split=None):
    """{"name": "...", "chatlog": [{"who": "ann", "said": "...", "photo": "cat.png"}]}"""
    record = raw.value
    lines = record.get("chatlog")
    if not isinstance(lines, list) or not lines:
        raise RecordError("'chatlog' must be a non-empty list")
    turns = []
    for line in lines:
        if not isinstance(line, dict) or not isinstance(line.get("who"), str):
            raise RecordError(f"each chatlog line needs a 'who', got {json.dumps(line)[:60]}")
        photo = line.get("photo")
        photos = [Photo(description=line.get("caption", ""), path=Path(file).parent / photo)] if photo else []
        turns.append(Turn(line["who"], line.get("said", ""), photos))
    return Dialogue(str(record.get("name", raw.label)), turns, source="chatlog", split=split), len(lines)


def chatlog_id(record, raw) -> str:
    return str(record.get("name", raw.label)) if isinstance(record, dict) else raw.label


@hookimpl
def mmdialog_plugins():
    return [Plugin("generator", "palette", PaletteGenerator, "paints a colour grid from the description")]


@hookimpl
def mmdialog_dataset_formats():
    return [DatasetFormat("chatlog", is_chatlog, chatlog_id, parse_chatlog, "a JSON chat log")]
