"""Pallas kernels for jaxgen: each op is a small package (kernel, custom_vjp op, jnp reference, numpy masks)."""
