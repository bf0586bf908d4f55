"""`segrl serve`: the trained policy and head behind an HTTP API on Ray Serve (see README: Serving)."""
