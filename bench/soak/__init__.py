"""`python -m bench.soak`: bounded soak and chaos runs in the lab (see bench/soak/guest.py)."""
