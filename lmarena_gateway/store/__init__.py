"""Where sessions live: one package, one module per backend."""
