"""jaxgen: generative models in JAX/Flax."""
