"""Model forwards, shared by statistics, the evaluation and (later) routing and MoE: loading a model folder
or adapter, batching and padding token ids, pooling, label tokens. Never used by the engine or the methods."""
