"""Built-in methods: importing this package registers them."""
from g2d.methods import joint, unimodal  # noqa: F401
