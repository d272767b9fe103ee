"""Where mailboxes live, as tools: hashing and placement reports, live
moves between storage servers, rebalancing (docs/placement.md,
docs/moving.md). The default placement rule itself is pwserver's
(pwcache.placement)."""
