//! KV caches in GPU memory (feature `cuda`); being built (issue 5).
