"""The PBX side: render the site's Asterisk config from templates, and run a real Asterisk on loopback."""
