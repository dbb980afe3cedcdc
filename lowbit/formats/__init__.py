"""Number formats and quantizers: float formats, k-bit integer grids, group-wise weights,
activation quantizers, bit packing and byte accounting. Pure tensor functions."""
