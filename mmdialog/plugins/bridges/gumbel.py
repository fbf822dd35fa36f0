"""bridge ``gumbel``: straight-through Gumbel-softmax + the dynamic vocabulary
transformation matrix (DVTM) that carries the image loss into the LLM.

For each description token t the LLM's logits z_t give a straight-through
sample Y_t (Jang et al. 2017, Gumbel-softmax; Bengio et al. 2013, straight-
through): forward one-hot, backward the soft distribution's gradient.

``alignment="aligned"`` (default, docs/design.md §3): with the sampled tokens
decoded and re-tokenised for the text tower (ids c, character offsets),
A[m,t] = 1 where tower token m and LLM token t overlap in characters (rows
normalised), and

    E_m = W[c_m] + Σ_t A[m,t] · (Y_t − sg Y_t) · (M W)

with M the static sparse LLM→tower map. Forward, E is exactly the embedding
of the re-tokenised text (what the generator sees at inference); backward,
position m reaches only the LLM positions it came from.

``alignment="bag"`` reproduces the reference code's set-to-set matrix:
x = (Σ_t Y_t)·T with T the complete 0/1 block between the set of predicted
LLM tokens and the set of tower tokens, O = onehot(c) + x − sg x, E = O W —
one scalar per sample spread over a token set, added at every position of the
text (BOS to EOS; padding rows stay constant one-hots, as the reference pads
after the straight-through). The predicted tokens are decoded as the reference
decodes them: special tokens skipped, tokenisation spaces cleaned up.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field

from mmdialog.core.interfaces import Bridge, BuildContext, PluginOptions, PromptTokens, TextTower
from mmdialog.core.vocab import check_bridgeable, decode_with_offsets, embed_for_tower, static_map


def gumbel_softmax_st(logits: torch.Tensor, tau: float = 1.0, noise: bool = True, hard: bool = True,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """Straight-through Gumbel-softmax over the last dim of ``logits`` (…, V).

    y = softmax((z + g) / τ), g ~ Gumbel(0, 1) when ``noise``. With ``hard``
    the result is onehot(argmax y) + y − sg(y): one-hot values, y's gradient.
    """
    z = logits.float()
    if noise:
        u = torch.rand(z.shape, device=z.device, generator=generator).clamp_(1e-10, 1 - 1e-10)
        z = z - torch.log(-torch.log(u))
    y = torch.softmax(z / tau, dim=-1)
    if not hard:
        return y
    one_hot = torch.zeros_like(y).scatter_(-1, y.argmax(-1, keepdim=True), 1.0)
    return one_hot + (y - y.detach())  # y − sg(y) is exactly 0: the forward is exactly one-hot


def alignment_matrix(tower_offsets: list[tuple[int, int]], llm_spans: list[tuple[int, int]],
                     length: int) -> torch.Tensor:
    """A (S, length): 1 where tower token m and LLM token t share a character; rows sum to 1."""
    a = torch.zeros(len(tower_offsets), length)
    for m, (s, e) in enumerate(tower_offsets):
        if e <= s:  # special tokens and padding
            continue
        for t, (ls, le) in enumerate(llm_spans):
            if ls < e and s < le:
                a[m, t] = 1.0
    return a / a.sum(1, keepdim=True).clamp(min=1.0)


class GumbelOptions(PluginOptions):
    tau: float = Field(1.0, gt=0, description="softmax temperature τ")
    tau_final: float | None = Field(None, gt=0, description="anneal τ exponentially to this value")
    anneal_steps: int = Field(10000, gt=0, description="steps over which τ reaches tau_final")
    # The reference code adds no Gumbel noise: the decoded text is then the
    # argmax, i.e. what greedy inference would hand the generator.
    noise: bool = Field(False, description="add Gumbel noise (sample instead of argmax)")
    hard: bool = Field(True, description="straight-through one-hot; False feeds the soft mixture")
    alignment: Literal["aligned", "bag"] = "aligned"


class GumbelBridge(Bridge):
    Options = GumbelOptions
    differentiable = True

    def __init__(self, options: GumbelOptions, llm_tokenizer, towers: list[TextTower],
                 cache_dir: str | None) -> None:
        super().__init__()
        self.options = options
        self.tau = options.tau
        self.llm_tokenizer = llm_tokenizer
        self.towers = towers
        n_llm = len(llm_tokenizer)
        for i, tower in enumerate(towers):
            check_bridgeable(tower.tokenizer, f"generator text tower {i}")
        # Plain attributes, not buffers: sparse tensors must stay out of
        # state_dict and DDP's buffer broadcast; they are rebuilt from the cache.
        self.maps = [static_map(llm_tokenizer, t.tokenizer, n_llm, cache_dir) for t in towers]
        self._tables: dict[int, tuple[tuple, torch.Tensor]] = {}

    @classmethod
    def from_options(cls, options: GumbelOptions, ctx: BuildContext) -> GumbelBridge:
        assert ctx.llm is not None and ctx.generator is not None
        return cls(options, ctx.llm.tokenizer, ctx.generator.text_towers, ctx.cache_dir)

    def parameter_groups(self) -> dict:
        return {}

    def set_step(self, step: int) -> None:
        """τ_step = τ · (τ_final/τ)^(step/anneal_steps), clamped at τ_final."""
        o = self.options
        if o.tau_final is not None:
            frac = min(1.0, step / o.anneal_steps)
            self.tau = o.tau * math.exp(frac * math.log(o.tau_final / o.tau))

    def vocab_table(self, k: int) -> torch.Tensor:
        """M W (V_llm, d) for tower k; constant while the tower's embedding is frozen."""
        w = self.towers[k].embedding.weight
        key = (w.device, w.dtype, w._version, w.requires_grad)
        cached = self._tables.get(k)
        if cached is not None and cached[0] == key and not w.requires_grad:
            return cached[1]
        m = self.maps[k].to(w.device)
        table = torch.sparse.mm(m, w.float())  # (V_llm, d)
        if not w.requires_grad:
            self._tables[k] = (key, table)
        return table

    def forward(self, ids: torch.Tensor, mask: torch.Tensor,
                logits: torch.Tensor | None = None) -> list[PromptTokens]:
        o = self.options
        y = None
        if logits is not None and torch.is_grad_enabled():
            y = gumbel_softmax_st(logits, self.tau, o.noise, o.hard)    # (N, L, V)
            y = y * mask[..., None]
            ids = torch.where(mask, y.argmax(-1), ids)                  # the sampled tokens
        rows = [ids[n][mask[n]].tolist() for n in range(ids.shape[0])]
        if o.alignment == "bag":  # the reference's decoding; no offsets needed
            decoded = [(self.llm_tokenizer.decode(r, skip_special_tokens=True, clean_up_tokenization_spaces=True), [])
                       for r in rows]
        else:
            decoded = [decode_with_offsets(self.llm_tokenizer, r) for r in rows]
        texts = [text for text, _ in decoded]
        out = []
        for k, tower in enumerate(self.towers):
            tt, prompt = embed_for_tower(tower, texts)
            c, base = prompt.input_ids, prompt.inputs_embeds            # (N, S), (N, S, d)
            if y is None:
                out.append(prompt)
                continue
            table = self.vocab_table(k)
            if o.alignment == "bag":
                text_rows = tt.attention_mask.to(base.device, base.dtype)[..., None]   # (N, S, 1)
                emb = base + self._bag_delta(y, rows, c, tower) * text_rows
            else:
                a = torch.stack([
                    alignment_matrix(tt.offsets[n], spans + [(0, 0)] * (ids.shape[1] - len(spans)), ids.shape[1])
                    for n, (_, spans) in enumerate(decoded)]).to(base.device)  # (N, S, L)
                if o.hard:
                    emb = base + a @ ((y - y.detach()) @ table)         # (N, S, d)
                else:  # soft mixture at text positions; specials keep their rows
                    has = (a.sum(-1, keepdim=True) > 0).float()
                    emb = base * (1 - has) + a @ (y @ table)
            out.append(PromptTokens(c, emb, texts))
        return out

    @staticmethod
    def _bag_delta(y: torch.Tensor, rows: list[list[int]], c: torch.Tensor, tower: TextTower) -> torch.Tensor:
        special = set(tower.tokenizer.all_special_ids)
        w = tower.embedding.weight.float()
        deltas = []
        for n, row in enumerate(rows):
            llm_set = torch.tensor(sorted(set(row)), dtype=torch.long, device=y.device)
            s = (y[n][:, llm_set] - y[n][:, llm_set].detach()).sum()          # scalar, 0 in forward
            tower_set = sorted({int(i) for i in c[n].tolist()} - special)
            x = w[torch.tensor(tower_set, dtype=torch.long, device=w.device)].sum(0) if tower_set \
                else torch.zeros_like(w[0])
            deltas.append(s * x)                                              # (d,)
        return torch.stack(deltas)[:, None, :]                                # (N, 1, d)
