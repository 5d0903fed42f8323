"""The cluster layer: a deployment spec written by the planner and run on this host, on a Ray
cluster, or on Kubernetes (see docs/cluster.md)."""
