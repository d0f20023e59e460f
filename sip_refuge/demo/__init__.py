"""``sip-refuge demo``: the whole system on loopback, with a test camera, desk robots and a CCTV stand-in."""
