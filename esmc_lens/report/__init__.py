"""Explaining a run: its result object, named clusters, figures, diagnostics and the
paper's own numbers."""
