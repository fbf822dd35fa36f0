"""A complete third-party perceiver plugin (the README's "Writing a plugin").

tests/test_plugins.py installs this file as a package with an entry point
and builds a model with it.
"""
import torch
from torch import nn

from mmdialog import Perceiver, Plugin, PluginOptions, hookimpl


class GridOptions(PluginOptions):
    grid: int = 2  # the photo becomes grid × grid embeddings


class GridPerceiver(Perceiver):
    """Each cell of an average-pooled photo becomes one LLM input embedding."""

    Options = GridOptions
    image_size = 64
    trainable_by_default = ("projection",)  # a new layer: it trains unless the config says otherwise

    def __init__(self, options: GridOptions, llm_width: int) -> None:
        super().__init__()
        self.grid = options.grid
        self.num_tokens = options.grid ** 2
        self.proj = nn.Linear(3, llm_width)

    @classmethod
    def from_options(cls, options, ctx):
        return cls(options, ctx.llm.hidden_size)

    def parameter_groups(self):
        return {"projection": list(self.proj.parameters())}

    def forward(self, pixels: torch.Tensor, keys=None) -> torch.Tensor:  # (N, 3, H, W)
        cells = nn.functional.adaptive_avg_pool2d(pixels, self.grid)     # (N, 3, g, g)
        return self.proj(cells.flatten(2).transpose(1, 2))               # (N, g·g, D)


@hookimpl
def mmdialog_plugins():
    return [Plugin("perceiver", "grid", GridPerceiver, "average colour of grid cells")]
