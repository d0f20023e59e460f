"""The sidecar beside Asterisk: AMI follower, incident store, CCTV targets, cameras and the web app."""
