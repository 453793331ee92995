"""Ferry's server side: backbone pretraining and distribution, the ServerApp round loop,
aggregation, outputs."""
