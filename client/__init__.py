"""Ferry's client side: backbone cache, feature cache, DP trainer, privacy state, ClientApp."""
