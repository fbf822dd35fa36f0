"""Metrics of photo-sharing dialogue: ``text`` (BLEU, ROUGE-L, intent) and ``image`` (FID, KID, IS, CLIP)."""
