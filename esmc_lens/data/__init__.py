"""Images: the ESMC folder layout, decoding to RGB, a lazy image source, the synthetic set."""
