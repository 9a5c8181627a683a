"""Ray Serve graphs: one file per deployment, one typed builder per graph.

Only the model tiers are deployments (they must scale, fail and be swapped on their own);
auth, validation and the cascade decision are Ray-free classes composed in the ingress.
"""
