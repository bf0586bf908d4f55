"""Cluster plumbing: local start/join, runtime environments, KubeRay manifests."""
