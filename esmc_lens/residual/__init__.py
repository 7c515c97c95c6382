"""The capture stage: every layer's residual stream at the prompt positions
(:class:`~esmc_lens.residual.cache.ResidualCache`), on disk and across processes."""
