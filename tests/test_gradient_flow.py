"""The image loss reaches the LLM through ``gumbel`` and never through ``text``."""
import pytest
import torch

from mmdialog import build


@pytest.fixture(scope="module")
def models():
    return {"gumbel": build("tiny"), "text": build("tiny", bridge="text")}


def image_loss_grads(model, dialogue, agent="1"):
    """Gradients of the LLM's trainable parameters from λ·L_img alone."""
    model.zero_grad(set_to_none=True)
    out = model(model.collator([(dialogue, agent)]))
    assert out["image_samples"] == 1 and out["image_loss"] > 0
    out["image_loss"].backward()
    return {n: p.grad for n, p in model.llm.named_parameters() if p.requires_grad}


def test_image_loss_reaches_llm_through_gumbel(models, cat_dialogue):
    grads = image_loss_grads(models["gumbel"], cat_dialogue)
    # LoRA's B starts at zero, so at step 0 the gradient lands on every B (A's is B-weighted: 0).
    lora_b = [g for n, g in grads.items() if "lora_B" in n]
    assert len(lora_b) == 3 * 30  # q, k, v in SmolLM2's 30 layers
    assert all(g is not None and float(g.abs().sum()) > 0 for g in lora_b)


def test_image_loss_stops_at_the_text_bridge(models, cat_dialogue):
    grads = image_loss_grads(models["text"], cat_dialogue)
    assert grads and all(g is None or float(g.abs().sum()) == 0 for g in grads.values())


def test_image_loss_reaches_the_perceiver_through_gumbel(models, cat_dialogue):
    """The photo is perceived after the sharer's turn; a later description
    depends on it, so the image loss trains the Q-Former projection too."""
    from mmdialog import Photo, Turn

    d = cat_dialogue
    d.turns.append(Turn("1", "and another one", [Photo(description="the same cat asleep", path=d.turns[3].photos[0].path)]))
    model = models["gumbel"]
    model.zero_grad(set_to_none=True)
    batch = model.collator([(d, "1")])
    out = model(batch)
    out["image_loss"].backward()
    g = model.perceiver.projection.weight.grad
    assert g is not None and g.abs().sum() > 0


def test_forward_returns_the_three_losses(models, cat_dialogue):
    model = models["gumbel"]
    out = model(model.collator([(cat_dialogue, "1"), (cat_dialogue, "0")]))
    assert set(out) >= {"loss", "text_loss", "image_loss"}
    assert torch.isclose(out["loss"], out["text_loss"] + model.image_loss_weight * out["image_loss"])
    assert out["text_loss"] > 0 and out["image_loss"] > 0
