"""Every cross-component contract: the four component kinds, what they hand
each other, and the retriever a generator chain may put in front of a
generator. Every plugin subclasses one of ``KINDS``.

Shapes use B = dialogues in the batch, T = LLM tokens, D = LLM width,
N = photos (or description spans) in the batch, K = query tokens per photo,
L = description tokens, V = LLM vocabulary (added tokens included),
S = text-encoder positions (77 for CLIP), d = text-encoder width.

Every component names its parameters in groups (``parameter_groups``); the
assembler's freeze policy (``core/assembler.py``) decides which groups train.
The description markup is ``core/markup.py``.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from mmdialog.core.hookspecs import KIND_NAMES

if TYPE_CHECKING:
    from PIL import Image

    from mmdialog.core.caching import FeatureStore
    from mmdialog.core.data.schema import Photo


class PluginOptions(BaseModel):
    """Base of every plugin's options model; unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


@dataclass
class BuildContext:
    """What a factory may use: components built before it, and where to cache."""

    llm: LanguageModel | None = None
    generator: Generator | None = None
    cache_dir: str | None = None
    #: Whether a base checkpoint may run its own code (transformers' ``trust_remote_code``): only ever
    #: what the caller passed (``build(..., trust_remote_code=True)``, ``--trust-remote-code``), never a config.
    trust_remote_code: bool = False


class Component(nn.Module, ABC):
    """Common base: an options model, a factory and named parameter groups."""

    Options: ClassVar[type[PluginOptions]] = PluginOptions
    #: Groups the freeze policy trains unless the config's ``model.trainable`` says
    #: otherwise; every other group is frozen.
    trainable_by_default: ClassVar[tuple[str, ...]] = ()
    #: Groups whose AdamW moments are 8-bit with ``train.optimizer: adamw8bit`` unless
    #: ``train.optimizer_8bit_groups`` names others (the large trainable ones).
    optimizer_8bit_by_default: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def from_options(cls, options: PluginOptions, ctx: BuildContext) -> Component:
        return cls(options)  # type: ignore[call-arg]

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Group name → parameters; the freeze policy refers to these names."""
        return {"all": list(self.parameters())}

    def cached_encoders(self) -> list[nn.Module]:
        """Frozen parts whose every training output is kept in a per-photo cache
        once each photo was seen: training may move them off the accelerator after
        the first epoch (``core/caching.py``). Each call site runs them under
        ``caching.resident``."""
        return []

    def feature_store(self, root: str | None = None) -> FeatureStore | None:
        """The on-disk store of what ``cached_encoders`` compute per photo, under
        ``root`` (default ``$MMDIALOG_CACHE/features``; ``core/caching.py``), or None."""
        return None

    def encode_photo(self, pixels: torch.Tensor, variant: str = "") -> dict[str, torch.Tensor]:
        """What the store keeps for one photo ``(1, 3, S, S)`` in [0, 1], S the store's
        resolution; ``variant`` is one of the store's ``variants``."""
        raise NotImplementedError


class LanguageModel(Component):
    """A causal LM that writes replies and ``[img] description [/img]`` spans.

    * ``embed(input_ids (B,T) long) -> (B,T,D)``: differentiable input embeddings.
    * ``forward(inputs_embeds (B,T,D), attention_mask (B,T), positions=None)
      -> logits (B,T,V)``, differentiable w.r.t. the embeddings and trainable
      parameters; with ``positions (B,T) bool`` only those rows: ``(N,V)`` in
      row-major order (the LM head is skipped elsewhere).
    * ``generate(inputs_embeds (B,T,D), attention_mask (B,T), max_new_tokens,
      temperature, num_beams, stop_ids=None, suppress=None, on_step=None) -> new ids
      (B,T')``; rows are left-padded; a row stops at any of ``stop_ids`` (default
      the LLM's own); ``suppress[b]`` lists ids row b may never write; ``on_step(ids)``
      gets each decoding step's new token of every row (B,), where the decoding
      streams (greedy and sampling; beam search may not).
    * ``render(messages, add_generation_prompt)`` applies the chat template to
      ``[{"role": "user"|"assistant", "content": str}]`` and returns a string.
    * ``user_first``: the chat template needs the user to speak first (Llama-2-chat
      raises otherwise); the ``template`` prompt format then opens an agent-first
      conversation with an empty user message.
    * ``prompt_format``, ``system_prompt``: the registered prompt format the
      collator builds samples and prompts with (``core/prompts.py``), and its
      system prompt (None: the format's default).
    """

    tokenizer: Any
    hidden_size: int
    img_open_id: int   # "[img]"
    img_close_id: int  # "[/img]"
    image_token_id: int  # placeholder replaced by a perceiver's K embeddings
    pad_token_id: int
    stop_ids: list[int]  # ids that end the assistant's turn
    base_vocab: int | None = None  # tokenizer size before the model added its tokens (None: it added none)
    user_first: bool = False
    prompt_format: str = "template"
    system_prompt: str | None = None

    @abstractmethod
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor,
                positions: torch.Tensor | None = None) -> torch.Tensor: ...

    @abstractmethod
    def generate(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, *, max_new_tokens: int = 64,
                 temperature: float = 0.0, top_p: float = 1.0, num_beams: int = 1,
                 stop_ids: list[int] | None = None, suppress: list[list[int]] | None = None,
                 on_step: Callable[[list[int]], None] | None = None) -> torch.Tensor: ...

    @abstractmethod
    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str: ...


class Perceiver(Component):
    """Turns a photo into something the LLM reads; ``kind`` says which way.

    ``kind = "pixels"``: ``forward(pixels (N,3,H,W) float in [0,1], keys) -> (N,K,D)``
    with K = ``num_tokens``, differentiable; the embeddings replace K
    ``<image>`` placeholders. ``keys`` name each photo (its file; "" when
    unknown) so a plugin may cache what a frozen part of it computes.
    ``kind = "text"``: ``caption(photo) -> str`` is the text that stands for
    the photo, as ``[img] caption [/img]`` (the pipeline baseline). No gradient.
    """

    kind: ClassVar[Literal["pixels", "text"]] = "pixels"
    num_tokens: int = 0
    image_size: int = 224

    def forward(self, pixels: torch.Tensor, keys: list[str] | None = None) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} is a text perceiver")

    def caption(self, photo: Photo) -> str:
        raise NotImplementedError(f"{type(self).__name__} perceives pixels, not captions")


@dataclass
class TextTower:
    """One text encoder of a generator, as a bridge sees it: its tokenizer
    (fast, with offsets) and its token-embedding table (V_clip, d)."""

    tokenizer: Any
    embedding: nn.Embedding
    max_length: int = 77


@dataclass
class PromptTokens:
    """A bridge's output for one text tower.

    ``input_ids (N,S)`` are the tower's token ids of the description (exactly
    what its tokenizer gives for the decoded text); ``inputs_embeds (N,S,d)``
    equal ``embedding(input_ids)`` in the forward pass and carry the gradient
    back to the LLM when the bridge is differentiable.
    """

    input_ids: torch.Tensor
    inputs_embeds: torch.Tensor
    texts: list[str] = field(default_factory=list)


class Bridge(Component):
    """Carries description tokens from the LLM to the generator's text towers.

    ``forward(ids (N,L) long, mask (N,L) bool, logits (N,L,V) | None)
    -> list[PromptTokens]`` one per ``generator.text_towers``. ``ids`` are the
    description tokens (gold when teacher forcing, generated at inference);
    ``logits`` are the LLM's predictions *for* those positions. With
    ``differentiable = True`` the gradient of the prompt embeddings reaches
    ``logits``; otherwise ``logits`` is ignored.
    """

    differentiable: bool = False

    def set_step(self, step: int) -> None:
        """Called with the optimizer step before each training step (e.g. to anneal τ)."""

    @abstractmethod
    def forward(self, ids: torch.Tensor, mask: torch.Tensor,
                logits: torch.Tensor | None = None) -> list[PromptTokens]: ...


@dataclass
class GeneratedImage:
    """One photo the agent shares: drawn by a generator or retrieved from a library.

    ``caption`` and ``file`` name the library photo (retrieved only); ``score``
    is the retriever's similarity to the description, when one was asked.
    """

    image: Image.Image
    source: Literal["drawn", "retrieved"] = "drawn"
    plugin: str = ""
    caption: str | None = None
    score: float | None = None
    file: Path | None = None


class Generator(Component):
    """Produces (or retrieves) the shared photo from text-tower inputs.

    * ``text_towers``: the towers a bridge must feed, in order.
    * ``encode(prompts: list[PromptTokens]) -> conditioning`` (opaque object),
      differentiable w.r.t. ``inputs_embeds``.
    * ``loss(conditioning, pixels (N,3,H,W) float in [0,1], keys=None) -> scalar``
      the training loss (diffusion ε-MSE for Stable Diffusion); ``keys`` name
      each photo (its file) so per-photo work may be cached.
    * ``generate(conditioning, **options) -> list[GeneratedImage]`` for
      inference; options: num_inference_steps, guidance_scale, seed (an int for
      the batch, or a list: one per photo, each photo's noise from its own seed).
    * ``resolution``: side of the square training photos.
    """

    text_towers: list[TextTower]
    resolution: int = 512

    @abstractmethod
    def encode(self, prompts: list[PromptTokens]) -> Any: ...

    @abstractmethod
    def loss(self, conditioning: Any, pixels: torch.Tensor, keys: list[str] | None = None) -> torch.Tensor: ...

    @abstractmethod
    def generate(self, conditioning: Any, **options: Any) -> list[GeneratedImage]: ...


@dataclass
class Match:
    """A retriever's best photo for one description."""

    description: str
    file: Path
    caption: str
    score: float


class Retriever(ABC):
    """A generator that can also stand in front of another one (``library,sd``).

    ``DialogueModel.share`` runs the chain: for each description
    the retriever's best ``match`` is shared when its score reaches
    ``threshold``; the generator behind it draws the others.
    """

    threshold: float

    @abstractmethod
    def match(self, texts: list[str]) -> list[Match]: ...

    @abstractmethod
    def retrieve(self, match: Match) -> GeneratedImage | None:
        """The matched photo, or None when its file can no longer be read."""


KINDS: dict[str, type[Component]] = dict(zip(KIND_NAMES, (LanguageModel, Perceiver, Bridge, Generator)))
#: The component slots of a ``DialogueModel``, in build order (later factories see earlier ones).
BUILD_ORDER = ("llm", "generator", "perceiver", "bridge")
