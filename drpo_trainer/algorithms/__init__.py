"""The math of the objective: per-token policy losses (one registry), their aggregation over a
mini-batch, and group-relative advantages. Imports only the standard library and torch."""
