"""Metrics of photo-sharing dialogue: ``text`` (BLEU, ROUGE-L, intent), ``image`` (FID, KID, IS; the
Inception path in ``fidelity``, the stand-in network in ``stand_in``) and ``clip`` (CLIP score)."""
