"""Encoders and decoders per modality.

An encoder maps a batch (B, *data_shape) to (loc, raw_scale), each (B, D); the VAE turns the raw
scale into a scale with its parameterisation. A decoder maps latents (N, D) to the likelihood's
location (N, *data_shape); callers fold (M, K, B) into N so every latent goes through a decoder in
one call.
"""
