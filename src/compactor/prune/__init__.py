"""Pruning: unstructured and N:M (magnitude, Wanda, SparseGPT), structured cuts into a
smaller dense model, sparsity statistics, and the lottery-ticket procedure."""
