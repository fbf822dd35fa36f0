"""The aligned and bag dynamic vocabulary transformation matrices (docs/design.md §2–3),
on the real SmolLM2 and CLIP tokenizers."""
import pytest
import torch

from mmdialog.core.vocab import decode_with_offsets, static_map
from mmdialog.plugins.bridges.gumbel import GumbelBridge, GumbelOptions


def span_ids(tiny, text):
    return tiny.llm.tokenizer(text, add_special_tokens=False)["input_ids"]


def make_bridge(tiny, **opts):
    return GumbelBridge(GumbelOptions(**opts), tiny.llm.tokenizer, tiny.generator.text_towers, None)


def logits_for(ids, vocab, requires_grad=True):
    z = torch.randn(1, len(ids), vocab) * 0.1
    z[0, torch.arange(len(ids)), torch.tensor(ids)] = 10.0  # argmax = the given ids
    return z.requires_grad_(requires_grad)


def test_forward_equals_embedding_of_retokenised_text(tiny):
    ids = span_ids(tiny, " a tabby cat lying on a wooden floor")
    bridge = make_bridge(tiny)
    z = logits_for(ids, len(tiny.llm.tokenizer))
    mask = torch.ones(1, len(ids), dtype=torch.bool)
    (p,) = bridge(torch.tensor([ids]), mask, z)
    tower = tiny.generator.text_towers[0]
    ref = tower.tokenizer([" a tabby cat lying on a wooden floor"], padding="max_length", max_length=77,
                          return_tensors="pt")["input_ids"]
    assert torch.equal(p.input_ids, ref)
    assert torch.equal(p.inputs_embeds, tower.embedding(ref).float())  # exact, not close
    assert p.inputs_embeds.requires_grad


def test_gradient_of_each_clip_position_reaches_only_its_llm_tokens(tiny):
    text = " strawberries and whipped cream"
    ids = span_ids(tiny, text)
    bridge = make_bridge(tiny)
    tower = tiny.generator.text_towers[0]
    enc = tower.tokenizer([text], padding="max_length", max_length=77, return_offsets_mapping=True)
    _, llm_spans = decode_with_offsets(tiny.llm.tokenizer, ids)
    mask = torch.ones(1, len(ids), dtype=torch.bool)
    checked = 0
    for m, (s, e) in enumerate(enc["offset_mapping"][0]):
        if e <= s:
            continue
        z = logits_for(ids, len(tiny.llm.tokenizer))
        (p,) = bridge(torch.tensor([ids]), mask, z)
        (p.inputs_embeds[0, m] * torch.randn(p.inputs_embeds.shape[-1])).sum().backward()
        touched = {t for t in range(len(ids)) if z.grad[0, t].abs().sum() > 0}
        overlapping = {t for t, (ls, le) in enumerate(llm_spans) if ls < e and s < le}
        assert touched == overlapping, (m, touched, overlapping)
        checked += 1
    assert checked >= 4


def test_special_and_padding_positions_get_no_gradient(tiny):
    ids = span_ids(tiny, " a cup of coffee")
    z = logits_for(ids, len(tiny.llm.tokenizer))
    (p,) = make_bridge(tiny)(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.bool), z)
    p.inputs_embeds[0, 0].sum().backward(retain_graph=True)   # BOS
    p.inputs_embeds[0, -1].sum().backward()                  # padding
    assert z.grad.abs().sum() == 0


def test_bag_mode_matches_the_reference_formula_by_hand():
    """Hand-checked on a 4-token LLM vocab and a 5-token CLIP vocab.

    Reference: x = (Σ_t Y_t)·T, T = 1 on S_llm × S_clip; O = onehot(c) + x − sg x; E = O·W.
    Predicted LLM tokens {1, 3} (two positions), CLIP tokens c = [0, 2, 4, 1] with
    specials {0, 1}, so S_clip = {2, 4}. d/dz of Σ E·G = Σ_t (dY_t/dz_t)ᵀ·1_{S_llm}·(Σ_m G_m·(W_2 + W_4)).
    """
    torch.manual_seed(0)
    w = torch.randn(5, 3)
    c = torch.tensor([0, 2, 4, 1])
    z = torch.randn(2, 4)
    z[0, 1] += 5
    z[1, 3] += 5
    g = torch.randn(4, 3)

    # the literal reference computation with a dense T
    z_ref = z.clone().requires_grad_(True)
    p = torch.softmax(z_ref, -1)
    y = torch.nn.functional.one_hot(p.argmax(-1), 4).float() + (p - p.detach())
    t = torch.zeros(4, 5)
    t[[1, 1, 3, 3], [2, 4, 2, 4]] = 1.0
    x = y.sum(0) @ t                                                    # (V_clip,)
    o = torch.nn.functional.one_hot(c, 5).float() + x - x.detach()     # (S, V_clip)
    e_ref = o @ w
    (e_ref * g).sum().backward()

    # ours
    from types import SimpleNamespace

    z_ours = z.clone().requires_grad_(True)
    p2 = torch.softmax(z_ours, -1)
    y2 = (torch.nn.functional.one_hot(p2.argmax(-1), 4).float() + (p2 - p2.detach()))[None]
    tower = SimpleNamespace(tokenizer=SimpleNamespace(all_special_ids=[0, 1]),
                            embedding=torch.nn.Embedding.from_pretrained(w))
    delta = GumbelBridge._bag_delta(y2, [[1, 3]], c[None], tower)      # (1, 1, d)
    e_ours = w[c][None] + delta
    (e_ours * g[None]).sum().backward()

    assert torch.equal(e_ours[0], e_ref)                                 # forward: the text itself
    assert torch.allclose(z_ours.grad, z_ref.grad, atol=1e-6)
    # by hand: dL/dx_u = Σ_m G_m·W_u, so the scalar s = Σ_t Σ_{v∈{1,3}} Y_t[v] gets
    k = (g.sum(0) * (w[2] + w[4])).sum()
    soft = torch.softmax(z, -1)
    ind = torch.tensor([0.0, 1.0, 0.0, 1.0])
    by_hand = k * soft * (ind - (soft * ind).sum(-1, keepdim=True))      # softmax Jacobian · 1_S
    assert torch.allclose(z_ref.grad, by_hand, atol=1e-6)


def test_bag_mode_forward_is_exact_and_spreads_one_scalar(tiny):
    ids = span_ids(tiny, " a rocket on the launch pad")
    bridge = make_bridge(tiny, alignment="bag")
    z = logits_for(ids, len(tiny.llm.tokenizer))
    (p,) = bridge(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.bool), z)
    tower = tiny.generator.text_towers[0]
    assert torch.equal(p.inputs_embeds, tower.embedding(p.input_ids).float())
    p.inputs_embeds[0, 0].sum().backward()  # bag: even BOS carries the sample's scalar
    assert z.grad.abs().sum() > 0


def test_static_map_is_sparse_cached_and_correct(tiny, tmp_path):
    llm_tok, clip_tok = tiny.llm.tokenizer, tiny.generator.text_towers[0].tokenizer
    n = len(llm_tok)
    m = static_map(llm_tok, clip_tok, n, tmp_path)
    assert m.is_sparse and m.shape == (n, len(clip_tok))
    assert 40_000 < m._nnz() < 100_000          # ~66k for SmolLM2 × CLIP (docs/design.md §3)
    assert len(list((tmp_path / "vocab_maps").glob("*.safetensors"))) == 1
    again = static_map(llm_tok, clip_tok, n, tmp_path)
    assert torch.equal(again.indices(), m.indices()) and torch.equal(again.values(), m.values())
    # row of " cat": all weight on CLIP's "cat</w>"
    cat = llm_tok(" cat", add_special_tokens=False)["input_ids"]
    assert len(cat) == 1
    row = m.index_select(0, torch.tensor(cat)).to_dense()[0]
    assert row[clip_tok.convert_tokens_to_ids("cat</w>")] == 1.0 and row.sum() == 1.0
    # added tokens map to nothing
    assert m.index_select(0, torch.tensor([tiny.llm.img_open_id])).to_dense().sum() == 0
    # rows are 1/k over k CLIP tokens: every non-empty row sums to 1
    sums = torch.sparse.sum(m, 1).to_dense()
    assert torch.allclose(sums[sums > 0], torch.ones(int((sums > 0).sum())))


def test_gumbel_noise_changes_decoded_text_but_stays_exact(tiny):
    ids = span_ids(tiny, " a dog")
    bridge = make_bridge(tiny, noise=True, tau=5.0)
    z = torch.zeros(1, len(ids), len(tiny.llm.tokenizer), requires_grad=True)  # flat logits
    (p,) = bridge(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.bool), z)
    tower = tiny.generator.text_towers[0]
    assert torch.equal(p.inputs_embeds, tower.embedding(p.input_ids).float())
    assert p.texts[0] != " a dog"


def test_tau_anneals(tiny):
    bridge = make_bridge(tiny, tau=2.0, tau_final=0.5, anneal_steps=100)
    bridge.set_step(0)
    assert bridge.tau == pytest.approx(2.0)
    bridge.set_step(50)
    assert bridge.tau == pytest.approx(1.0)
    bridge.set_step(500)
    assert bridge.tau == pytest.approx(0.5)


def test_bag_mode_leaves_padding_rows_constant_and_decodes_as_the_reference(tiny):
    """The reference pads its CLIP rows after the straight-through: padding rows are
    constant one-hots, so no gradient reaches the logits through them; and it decodes
    the predicted tokens with special tokens skipped."""
    tok = tiny.llm.tokenizer
    ids = span_ids(tiny, " a red kite") + [tok.eos_token_id]
    bridge = make_bridge(tiny, alignment="bag")
    z = logits_for(ids, len(tok))
    (p,) = bridge(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.bool), z)
    assert p.texts == [tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=True)]
    assert tok.eos_token not in p.texts[0]
    n_text = int((p.input_ids[0] != p.input_ids[0, -1]).sum()) + 1       # BOS … EOS
    p.inputs_embeds[0, n_text:].sum().backward(retain_graph=True)        # the padding rows
    assert z.grad is None or z.grad.abs().sum() == 0
    p.inputs_embeds[0, n_text - 1].sum().backward()                     # EOS still carries the scalar
    assert z.grad.abs().sum() > 0
