"""The post agent: a pure state machine, the button/LED panel, SIP backends and the runner that owns threads."""
