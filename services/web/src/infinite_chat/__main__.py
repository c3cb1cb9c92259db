"""`python -m infinite_chat`: one replica; with no REDIS_URL it runs alone on an in-memory broker."""

from .server import main

main()
