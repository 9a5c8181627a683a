"""Long-lived named actors (drift monitor, rollout controller).

Nothing lives here yet: the spine serves a fixed champion. The drift monitor and the
canary rollout controller arrive with their own issues, as Ray-free logic classes plus
thin ``@ray.remote`` wrappers.
"""
