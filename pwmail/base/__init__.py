"""The shared base: settings loader, logging set-up, the configuration
error type, the HOST:PORT reader. Imports nothing of ours, so every part
(pwcache included) may use it."""
