"""The logit lens: the unembedding (final norm + lm_head), its readouts, the keyword rule."""
