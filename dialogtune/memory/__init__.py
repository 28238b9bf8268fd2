"""Memory models: a fixed-size learned memory carried across turns and sessions."""
