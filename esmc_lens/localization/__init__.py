"""Embedding selection: criterion keywords, keyword-vote localization (Algorithm 1), and
the target embeddings read at the cells it picks."""
