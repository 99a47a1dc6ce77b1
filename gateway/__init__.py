"""gateway: a two-factor authentication gateway."""
