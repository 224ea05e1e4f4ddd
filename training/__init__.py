"""Training of the Language Quantized AutoEncoder (console script ``lqae-train``)."""
