"""Cluster plumbing: local start/join, the topology that starts the actor pools, KubeRay manifests."""
