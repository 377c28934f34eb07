"""The overlay: identities, framed messages, the Network interface and its backends, gossip."""
